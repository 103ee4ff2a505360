"""Learned baselines that CDL-Λ is compared with, sharing its interface and data normalisation.

* :class:`ImageUNet` — the ablation: the U-Net of NET_Θ (same blocks, 2 → 2 channels) maps the normalised
  zero-filled image straight to the image, x = x₀ + U([Re, Im] x₀) (a residual skip, no data model, no dictionary).
* :class:`UnrolledNet` — a small black-box unrolled network of the MoDL kind (Aggarwal et al. 2019): ``cascades``
  alternations of a shared CNN denoiser and exact data consistency,

      z_n = x_n + U(x_n),   x_{n+1} = argmin_x ‖A x − y‖² + μ‖x − z_n‖²,

  with a learned μ = softplus(raw) > 0. For a single coil A = S F and the data-consistency step is exact in k-space:
  F x_{n+1} = (S y + μ F z_n) / (S + μ). Multi-coil data use the coil-combined zero-filled image and the same
  single-coil formula on the coil-combined k-space (an approximation; the evaluation is single coil).

Both take ``(kspace, mask, dictionary=None, coil_maps=None)`` like :class:`recon.model.CDLLambda` (the dictionary is
ignored) and return a :class:`recon.model.ReconOutput` whose ``lambda_maps`` is an empty ``(B, 0, ny, nx)`` tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recon import fft as _fft
from recon.lambda_nets import UNet, _complex_to_channels
from recon.model import ReconOutput, data_scale
from recon.operators import make_operator


def _channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """real ``(B, 2, ny, nx)`` → complex ``(B, ny, nx)``."""
    return torch.complex(x[:, 0], x[:, 1])


class _Normalised(nn.Module):
    """Shared entry: x₀ = Aᴴy, then k-space and x₀ divided by :func:`recon.model.data_scale` (centred layout)."""

    def prepare(self, kspace, mask, coil_maps):
        multi = coil_maps is not None
        kspace = kspace.to(torch.complex64)
        mask = mask.to(device=kspace.device, dtype=torch.float32)
        op = make_operator(mask, coil_maps.to(torch.complex64) if multi else None, centred=True)
        x0 = op.adjoint(kspace)
        scale = data_scale(x0, mask)
        x0 = x0 / scale[:, None, None]
        y = kspace / scale.view(-1, *(1,) * (kspace.ndim - 1))
        return x0, y, mask, scale

    @staticmethod
    def output(image, x0, scale) -> ReconOutput:
        rescale = scale[:, None, None]
        empty = image.real.new_zeros(image.shape[0], 0, *image.shape[-2:])
        return ReconOutput(image=image * rescale, zero_filled=x0 * rescale, low_pass=x0 * rescale,
                           lambda_maps=empty, scale=scale)


class ImageUNet(_Normalised):
    """The image-only ablation: x = x₀ + U([Re, Im] x₀), U the NET_Θ U-Net with 2 → 2 channels."""

    kind = "ablation"

    def __init__(self, base_channels: int = 16, stages: int = 2):
        super().__init__()
        self.base_channels, self.stages = base_channels, stages
        self.unet = UNet(2, 2, base_channels, stages)

    def forward(self, kspace, mask, dictionary=None, coil_maps=None, **_) -> ReconOutput:
        x0, _, _, scale = self.prepare(kspace, mask, coil_maps)
        image = x0 + _channels_to_complex(self.unet(_complex_to_channels(x0.unsqueeze(1))))
        return self.output(image, x0, scale)

    def config(self) -> dict:
        return dict(kind=self.kind, base_channels=self.base_channels, stages=self.stages)


class UnrolledNet(_Normalised):
    """MoDL-style unrolled network: ``cascades`` × (shared U-Net denoiser → exact data consistency)."""

    kind = "unrolled"

    def __init__(self, base_channels: int = 16, stages: int = 2, cascades: int = 4, mu: float = 1.0):
        super().__init__()
        self.base_channels, self.stages, self.cascades = base_channels, stages, cascades
        self.unet = UNet(2, 2, base_channels, stages)
        self.raw_mu = nn.Parameter(torch.tensor(math.log(math.expm1(mu))))

    def forward(self, kspace, mask, dictionary=None, coil_maps=None, **_) -> ReconOutput:
        x0, y, mask, scale = self.prepare(kspace, mask, coil_maps)
        if coil_maps is not None:  # coil-combined k-space of the zero-filled image
            y = mask * _fft.fft2c(x0)
        mu = F.softplus(self.raw_mu)
        x = x0
        for _ in range(self.cascades):
            z = x + _channels_to_complex(self.unet(_complex_to_channels(x.unsqueeze(1))))
            x = _fft.ifft2c((mask * y + mu * _fft.fft2c(z)) / (mask + mu))
        return self.output(x, x0, scale)

    def config(self) -> dict:
        return dict(kind=self.kind, base_channels=self.base_channels, stages=self.stages, cascades=self.cascades)


BASELINES = {"ablation": ImageUNet, "unrolled": UnrolledNet}


def build_baseline(config: dict) -> nn.Module:
    """Rebuild a baseline from its ``config()``."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; expected one of {sorted(BASELINES)}")
    return BASELINES[kind](**config)
