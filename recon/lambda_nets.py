"""NET_Θ: networks that infer the sparsity-level maps Λ (one non-negative map per filter).

All take the zero-filled image ``x0`` (complex ``(B, ny, nx)``, centred layout, normalised) and a
:class:`~recon.dictionary.Dictionary` and return Λ, float ``(B, K, ny, nx)``, bounded: Λ = u_b · sigmoid(u).

* V1: U-Net on [Re x0, Im x0], 2 → K channels. Sized by K; filter order is baked in (not equivariant).
* V2: U-Net on [Re, Im] of Dᴴx0, 2K → K. Channels mix across filters (not equivariant).
* V3: one shared U-Net 2 → 1 applied to each filter's [Re, Im] (Dᴴx0)_k, filters folded into the batch. Exactly
  equivariant, Λ(πD) = πΛ(D), so x* is invariant to the filter order; any K and any k_f at inference.

V3 with ``background=True`` also infers the background weight b of :mod:`recon.background` from x0 (its own small
U-Net; b does not depend on the dictionary, so the equivariance holds).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdl_lambda.recon.background import BackgroundWeight
from cdl_lambda.recon.dictionary import Dictionary


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))


class UNet(nn.Module):
    """Small U-Net: 3×3 conv + LeakyReLU blocks, max-pool down, bilinear up with skips, final 1×1 conv, no
    normalisation layers. Any input size (up-sampled features are resized to their skip's size)."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 16, stages: int = 2):
        super().__init__()
        widths = [base_channels * 2 ** i for i in range(stages + 1)]
        self.down = nn.ModuleList([_ConvBlock(in_channels, widths[0])] +
                                  [_ConvBlock(widths[i], widths[i + 1]) for i in range(stages)])
        self.up = nn.ModuleList([_ConvBlock(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(stages))])
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def _complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """complex ``(B, C, ny, nx)`` → real ``(B, 2C, ny, nx)`` as [Re c0, Im c0, Re c1, Im c1, …]."""
    return torch.view_as_real(x).permute(0, 1, 4, 2, 3).flatten(1, 2)


INITIAL_LOGIT = -3.0
CPU_CHUNK_PIXELS = 2 ** 17  # maps × pixels per U-Net pass on the CPU (measured best at 128², 256² and 384²)


class LambdaNet(nn.Module):
    """Common output activation: Λ = u_b · sigmoid(u). The head's bias starts at ``INITIAL_LOGIT`` so an untrained
    network begins with weak regularisation (Λ ≈ 0.05 u_b), where the soft-threshold still passes gradients."""

    version = "base"

    def __init__(self, upper_bound: float = 1.0):
        super().__init__()
        self.upper_bound = upper_bound
        self.matrix: int | None = None  # the largest matrix it was trained at, set when a trained network is loaded

    def _init_head(self) -> None:
        nn.init.constant_(self.unet.head.bias, INITIAL_LOGIT)

    def activate(self, u: torch.Tensor) -> torch.Tensor:
        return self.upper_bound * torch.sigmoid(u)

    def config(self) -> dict:
        raise NotImplementedError


class LambdaNetV1(LambdaNet):
    """U-Net 2 → K on the zero-filled image (K fixed at construction)."""

    version = "v1"

    def __init__(self, num_filters: int, base_channels: int = 16, stages: int = 2, upper_bound: float = 1.0):
        super().__init__(upper_bound)
        self.num_filters = num_filters
        self.base_channels, self.stages = base_channels, stages
        self.unet = UNet(2, num_filters, base_channels, stages)
        self._init_head()

    def forward(self, x0: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
        if dictionary.num_filters != self.num_filters:
            raise ValueError(f"V1 was built for K={self.num_filters}, the dictionary has K={dictionary.num_filters}")
        return self.activate(self.unet(_complex_to_channels(x0.unsqueeze(1))))

    def config(self) -> dict:
        return dict(version=self.version, num_filters=self.num_filters, base_channels=self.base_channels,
                    stages=self.stages, upper_bound=self.upper_bound)


class LambdaNetV2(LambdaNetV1):
    """U-Net 2K → K on Dᴴx0 (K fixed at construction; channels mix across filters)."""

    version = "v2"

    def __init__(self, num_filters: int, base_channels: int = 16, stages: int = 2, upper_bound: float = 1.0):
        LambdaNet.__init__(self, upper_bound)
        self.num_filters = num_filters
        self.base_channels, self.stages = base_channels, stages
        self.unet = UNet(2 * num_filters, num_filters, base_channels, stages)
        self._init_head()

    def forward(self, x0: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
        if dictionary.num_filters != self.num_filters:
            raise ValueError(f"V2 was built for K={self.num_filters}, the dictionary has K={dictionary.num_filters}")
        return self.activate(self.unet(_complex_to_channels(dictionary.analyze(x0))))


class LambdaNetV3(LambdaNet):
    """One U-Net 2 → 1 shared by all filters: Λ_k = u_b · sigmoid(U([Re, Im] (Dᴴx0)_k)).

    ``chunk`` bounds how many filter maps pass through the U-Net at once (memory on large K × batch). On the CPU the
    chunk is also cut to about :data:`CPU_CHUNK_PIXELS` pixels, so that the activations stay in the caches: the
    memory-bound concatenations and up-samplings then run about twice as fast at 256² (the result is the same)."""

    version = "v3"

    def __init__(self, base_channels: int = 16, stages: int = 2, upper_bound: float = 1.0, chunk: int = 256,
                 background: bool = False, background_form: str = "penalty", background_step: str = "uniform"):
        super().__init__(upper_bound)
        self.base_channels, self.stages, self.chunk = base_channels, stages, chunk
        self.unet = UNet(2, 1, base_channels, stages)
        self._init_head()
        self.background = (BackgroundWeight(UNet(2, 1, base_channels, stages), background_form, background_step)
                           if background else None)

    def forward(self, x0: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
        coefficients = dictionary.analyze(x0)  # (B, K, ny, nx)
        batch, k = coefficients.shape[:2]
        per_filter = _complex_to_channels(coefficients.flatten(0, 1).unsqueeze(1))  # (B·K, 2, ny, nx)
        # channels-last activations: oneDNN/cuDNN convolutions run markedly faster in that layout
        per_filter = per_filter.contiguous(memory_format=torch.channels_last)
        chunk = self.chunk
        if not per_filter.is_cuda:
            chunk = max(1, min(chunk, round(CPU_CHUNK_PIXELS / (per_filter.shape[-2] * per_filter.shape[-1]))))
        out = torch.cat([self.unet(part) for part in per_filter.split(chunk)], dim=0).contiguous()
        return self.activate(out.view(batch, k, *out.shape[-2:]))

    def config(self) -> dict:
        extra = {}
        if self.background is not None:  # the penalty form is the default and stays implicit
            extra["background"] = True
            if self.background.form != "penalty":
                extra["background_form"] = self.background.form
            if self.background.step != "uniform":
                extra["background_step"] = self.background.step
        return dict(version=self.version, base_channels=self.base_channels, stages=self.stages,
                    upper_bound=self.upper_bound, **extra)


NETWORKS = {"v1": LambdaNetV1, "v2": LambdaNetV2, "v3": LambdaNetV3}


def build_lambda_net(config: dict) -> LambdaNet:
    """Rebuild a network from its ``config()`` dictionary."""
    config = dict(config)
    version = config.pop("version", None)
    if version not in NETWORKS:
        raise ValueError(f"unknown Λ-network version {version!r}; expected one of {sorted(NETWORKS)}")
    return NETWORKS[version](**config)


def set_trained_matrix(network: nn.Module, size: int | None) -> None:
    """Record on ``network`` the largest matrix it was trained at, ``size`` × ``size``: its Λ network then sees a
    larger image's dictionary at the scale it learned (:meth:`recon.model.CDLLambda.dictionary_scale_for`), and its
    background weight (if any) infers b on a grid no finer (:func:`recon.background.on_coarser_grid`): both judge
    the anatomy by its size in pixels, learned at that scale (docs/site-safety.md, docs/evaluation.md)."""
    if not size:
        return
    network.matrix = int(size)
    weight = getattr(network, "background", None)
    if weight is not None:
        weight.matrix = int(size)
