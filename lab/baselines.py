"""Learned baselines that CDL-Λ is compared with, sharing its interface and its noise units.

* :class:`ImageUNet` — the ablation: the U-Net of NET_Θ (same blocks, 2 → 2 channels) maps the zero-filled image
  straight to the image, x = x₀ + U(x₀) (a residual skip, no data model, no dictionary).
* :class:`UnrolledNet` — a small black-box unrolled network of the MoDL kind (Aggarwal et al. 2019): ``cascades``
  alternations of a shared CNN denoiser and data consistency,

      z_n = x_n + U(x_n),   x_{n+1} = argmin_x ‖A x − y‖² + μ‖x − z_n‖²,

  with a learned μ = softplus(raw) > 0. For a single coil A = S F and the step is exact in k-space:
  F x_{n+1} = (S y + μ F z_n) / (S + μ); for several coils (AᴴA + μI) x = Aᴴy + μ z_n is solved by conjugate
  gradients (:func:`recon.lowpass.conjugate_gradient`).

Units as in :class:`recon.model.CDLLambda`: the data are divided by the noise level σ (given, or estimated by
:func:`recon.noise.noise_level`), the U-Nets see x / (4σ), and the output is scaled back. With coil maps the
image is zero outside their support. Both take ``(kspace, mask, dictionary=None, coil_maps=None, noise_std=None)``
like CDL-Λ (the dictionary is ignored) and return a :class:`recon.model.ReconOutput` whose ``lambda_maps`` is an
empty ``(B, 0, ny, nx)`` tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.lambda_nets import UNet, _complex_to_channels
from cdl_lambda.recon.lowpass import conjugate_gradient
from cdl_lambda.recon.model import NETWORK_INPUT_SCALE, ReconOutput
from cdl_lambda.recon.noise import noise_level
from cdl_lambda.recon.operators import make_operator


def _channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """real ``(B, 2, ny, nx)`` → complex ``(B, ny, nx)``."""
    return torch.complex(x[:, 0], x[:, 1])


def _residual_unet(base_channels: int, stages: int) -> UNet:
    """The NET_Θ U-Net, 2 → 2 channels, with its last layer zero: x + U(x) starts as the identity, so training
    begins at the zero-filled (ablation) or CG-SENSE-like (unrolled) image instead of one with random output
    added."""
    unet = UNet(2, 2, base_channels, stages)
    nn.init.zeros_(unet.head.weight)
    nn.init.zeros_(unet.head.bias)
    return unet


def _denoise(unet: UNet, x: torch.Tensor) -> torch.Tensor:
    """x + U(x) with the U-Net working on x / 4 (noise units)."""
    scaled = _complex_to_channels((x * NETWORK_INPUT_SCALE).unsqueeze(1))
    return x + _channels_to_complex(unet(scaled)) / NETWORK_INPUT_SCALE


class _NoiseUnits(nn.Module):
    """Shared entry: y / σ and x₀ = Aᴴ(y / σ) (centred layout), the operator, and the maps' support."""

    def prepare(self, kspace, mask, coil_maps, noise_std):
        multi = coil_maps is not None
        kspace = kspace.to(torch.complex64)
        mask = mask.to(device=kspace.device, dtype=torch.float32)
        if noise_std is None:
            noise_std = noise_level(kspace if multi else kspace.unsqueeze(1), mask if mask.ndim == 2 else mask[0])[0]
        sigma = torch.as_tensor(noise_std, dtype=torch.float32, device=kspace.device).reshape(-1).expand(len(kspace))
        op = make_operator(mask, coil_maps.to(torch.complex64) if multi else None, centred=True)
        y = kspace / sigma.view(-1, *(1,) * (kspace.ndim - 1))
        support = (coil_maps.abs().pow(2).sum(dim=-3) > 0).float() if multi else None
        return op.adjoint(y), y, mask, op, sigma, support

    @staticmethod
    def output(image, x0, sigma, support) -> ReconOutput:
        if support is not None:
            image = image * support
        rescale = sigma[:, None, None]
        empty = image.real.new_zeros(image.shape[0], 0, *image.shape[-2:])
        ratio = image.real.new_full((image.shape[0],), float("nan"))
        return ReconOutput(image=image * rescale, zero_filled=x0 * rescale, low_pass=x0 * rescale,
                           lambda_maps=empty, noise_std=sigma, residual_to_noise=ratio)


class ImageUNet(_NoiseUnits):
    """The image-only ablation: x = x₀ + U([Re, Im] x₀), U the NET_Θ U-Net with 2 → 2 channels."""

    kind = "ablation"

    def __init__(self, base_channels: int = 16, stages: int = 2):
        super().__init__()
        self.base_channels, self.stages = base_channels, stages
        self.unet = _residual_unet(base_channels, stages)

    def forward(self, kspace, mask, dictionary=None, coil_maps=None, noise_std=None, **_) -> ReconOutput:
        x0, _, _, _, sigma, support = self.prepare(kspace, mask, coil_maps, noise_std)
        return self.output(_denoise(self.unet, x0), x0, sigma, support)

    def config(self) -> dict:
        return dict(kind=self.kind, base_channels=self.base_channels, stages=self.stages)


class UnrolledNet(_NoiseUnits):
    """MoDL-style unrolled network: ``cascades`` × (shared U-Net denoiser → exact data consistency)."""

    kind = "unrolled"

    def __init__(self, base_channels: int = 16, stages: int = 2, cascades: int = 4, mu: float = 1.0,
                 cg_iterations: int = 6):
        super().__init__()
        self.base_channels, self.stages, self.cascades = base_channels, stages, cascades
        self.cg_iterations = cg_iterations
        self.unet = _residual_unet(base_channels, stages)
        self.raw_mu = nn.Parameter(torch.tensor(math.log(math.expm1(mu))))

    def forward(self, kspace, mask, dictionary=None, coil_maps=None, noise_std=None, **_) -> ReconOutput:
        x0, y, mask, op, sigma, support = self.prepare(kspace, mask, coil_maps, noise_std)
        mu = F.softplus(self.raw_mu)
        x = x0
        for _ in range(self.cascades):
            z = _denoise(self.unet, x)
            if coil_maps is None:
                x = _fft.ifft2c((mask * y + mu * _fft.fft2c(z)) / (mask + mu))
            else:
                x = conjugate_gradient(lambda v: op.normal(v) + mu * v, x0 + mu * z, z, self.cg_iterations)
        return self.output(x, x0, sigma, support)

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
