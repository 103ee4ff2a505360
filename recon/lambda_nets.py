"""NET_Θ: networks that infer the sparsity-level maps Λ (one non-negative map per filter).

All take the zero-filled image ``x0`` (complex ``(B, ny, nx)``, centred layout, normalised) and a
:class:`~recon.dictionary.Dictionary` and return Λ, float ``(B, K, ny, nx)``, bounded: Λ = u_b · sigmoid(u).

* V1: U-Net on [Re x0, Im x0], 2 → K channels. Sized by K; filter order is baked in (not equivariant).
* V2: U-Net on [Re, Im] of Dᴴx0, 2K → K. Channels mix across filters (not equivariant).
* V3: one shared U-Net 2 → 1 applied to each filter's [Re, Im] (Dᴴx0)_k, filters folded into the batch. Exactly
  equivariant, Λ(πD) = πΛ(D), so x* is invariant to the filter order; any K and any k_f at inference.
  With ``context=True`` every filter's input also carries what is the same for all filters: [Re, Im] x0 and the
  mean over filters of |(Dᴴx0)_k| (a symmetric function of the filters), 5 → 1: still exactly equivariant, any K.

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

    @torch.no_grad()
    def load_narrower(self, state: dict, base_channels: int) -> None:
        """Start from the weights ``state`` of a U-Net of the same stages, ``base_channels`` ≤ this one's and no more
        inputs, so that this one computes the same output on inputs whose extra channels follow the old ones: every
        old weight in its place, the weights from new channels (and inputs) into the old channels zero — the new
        channels compute, but nothing reads them yet — and the new channels' own from their initialisation. A block
        that concatenates the up-sampled features with the skip is mapped part by part."""
        stages = len(self.up)
        old = [base_channels * 2 ** i for i in range(stages + 1)]
        new = [self.head.in_channels * 2 ** i for i in range(stages + 1)]
        if any(o > n for o, n in zip(old, new)):
            raise ValueError(f"a U-Net of {base_channels} base channels is not narrower than {new[0]}")

        def spans(parts):  # old input channels → positions among the new ones: [(new_start, count), …]
            starts = [0]
            for _, n in parts[:-1]:
                starts.append(starts[-1] + n)
            return [(start, o) for start, (o, _) in zip(starts, parts)]

        inputs = {}  # module prefix → (old input spans, old output channels)
        inputs["down.0.0"] = ([(0, state["down.0.0.weight"].shape[1])], old[0])  # the first inputs may be fewer
        inputs["down.0.2"] = (spans([(old[0], new[0])]), old[0])
        for i in range(1, stages + 1):
            inputs[f"down.{i}.0"] = (spans([(old[i - 1], new[i - 1])]), old[i])
            inputs[f"down.{i}.2"] = (spans([(old[i], new[i])]), old[i])
        for j, i in enumerate(reversed(range(stages))):
            inputs[f"up.{j}.0"] = (spans([(old[i + 1], new[i + 1]), (old[i], new[i])]), old[i])
            inputs[f"up.{j}.2"] = (spans([(old[i], new[i])]), old[i])
        inputs["head"] = (spans([(old[0], new[0])]), self.head.out_channels)
        own = self.state_dict()
        for prefix, (parts, out) in inputs.items():
            weight, bias = own[prefix + ".weight"], own[prefix + ".bias"]
            weight[:out] = 0
            column = 0
            for start, count in parts:
                weight[:out, start:start + count] = state[prefix + ".weight"][:, column:column + count]
                column += count
            bias[:out] = state[prefix + ".bias"]
        self.load_state_dict(own)


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


CONTEXT_CHANNELS = 3


def filter_context(x0: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """What every filter's Λ may also see, invariant to the filters' order: real ``(B, 3, ny, nx)`` of [Re x0,
    Im x0, mean_k |(Dᴴx0)_k|] (the image, and how much the dictionary as a whole responds at each pixel)."""
    image = torch.view_as_real(x0).permute(0, 3, 1, 2)
    # sorted first, so the sum runs in the same order whatever the filters' order: exactly invariant, not to rounding
    response = coefficients.abs().sort(dim=1).values.mean(dim=1, keepdim=True)
    return torch.cat([image, response], dim=1)


class LambdaNetV3(LambdaNet):
    """One U-Net 2 → 1 shared by all filters: Λ_k = u_b · sigmoid(U([Re, Im] (Dᴴx0)_k)); with ``context``,
    5 → 1: Λ_k = u_b · sigmoid(U([Re, Im] (Dᴴx0)_k, :func:`filter_context`)).

    ``chunk`` bounds how many filter maps pass through the U-Net at once (memory on large K × batch). On the CPU the
    chunk is also cut to about :data:`CPU_CHUNK_PIXELS` pixels, so that the activations stay in the caches: the
    memory-bound concatenations and up-samplings then run about twice as fast at 256² (the result is the same)."""

    version = "v3"

    def __init__(self, base_channels: int = 16, stages: int = 2, upper_bound: float = 1.0, chunk: int = 256,
                 background: bool = False, background_form: str = "penalty", background_step: str = "uniform",
                 context: bool = False):
        super().__init__(upper_bound)
        self.base_channels, self.stages, self.chunk, self.context = base_channels, stages, chunk, context
        self.unet = UNet(2 + CONTEXT_CHANNELS * context, 1, base_channels, stages)
        self._init_head()
        self.background = (BackgroundWeight(UNet(2, 1, base_channels, stages), background_form, background_step)
                           if background else None)

    def forward(self, x0: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
        coefficients = dictionary.analyze(x0)  # (B, K, ny, nx)
        batch, k = coefficients.shape[:2]
        per_filter = _complex_to_channels(coefficients.flatten(0, 1).unsqueeze(1))  # (B·K, 2, ny, nx)
        if self.context:
            shared = filter_context(x0, coefficients)  # (B, 3, ny, nx), the same for every filter
            shared = shared.unsqueeze(1).expand(batch, k, *shared.shape[1:]).flatten(0, 1)
            per_filter = torch.cat([per_filter, shared], dim=1)  # (B·K, 5, ny, nx)
        # channels-last activations: oneDNN/cuDNN convolutions run markedly faster in that layout
        per_filter = per_filter.contiguous(memory_format=torch.channels_last)
        chunk = self.chunk
        if not per_filter.is_cuda:
            chunk = max(1, min(chunk, round(CPU_CHUNK_PIXELS / (per_filter.shape[-2] * per_filter.shape[-1]))))
        out = torch.cat([self.unet(part) for part in per_filter.split(chunk)], dim=0).contiguous()
        return self.activate(out.view(batch, k, *out.shape[-2:]))

    def config(self) -> dict:
        extra = {"context": True} if self.context else {}  # without it, as every network before it
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
