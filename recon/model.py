"""CDL-Λ: (PH) low-pass split → NET_Θ infers Λ → FISTA on the weighted convolutional synthesis problem (PR).

    x₀ = Aᴴy,  x_L = (I + β∇ᴴ∇)⁻¹ x₀,  y′ = y − A x_L,
    s* = argmin_s ½‖A D s − y′‖² + Σ_k ‖Λ_k ⊙ Re s_k‖₁ + ‖Λ_k ⊙ Im s_k‖₁,   x* = x_L + D s*.

One FISTA gradient costs 2K FFTs (codes ↔ Fourier) plus 2C + 2 for a C-coil operator (none for a single coil,
where A D s = S Σ_k d̂_k ŝ_k directly in k-space). Step τ = c / L with L = max_ω Σ_k |d̂_k(ω)|² ≥ ‖A D‖².

Data normalisation: k-space is divided by ‖Aᴴy‖/√M (the RMS of the measured samples for one coil, see
:func:`data_scale`) before anything else; the image is scaled back, so outputs share the units of the input's
zero-filled image. Λ is in normalised units. Inputs and outputs use the centred layout; internally everything runs in the native FFT layout (shifts only at entry and exit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from recon import fft as _fft
from recon.dictionary import Dictionary
from recon.lambda_nets import LambdaNet
from recon.lowpass import LowPassSplit
from recon.operators import make_operator
from recon.solvers import fista


@dataclass
class ReconOutput:
    """Centred-layout results, in the units of the input (Λ in normalised units). Shapes (B, ny, nx) /
    (B, K, ny, nx)."""

    image: torch.Tensor
    zero_filled: torch.Tensor
    low_pass: torch.Tensor
    lambda_maps: torch.Tensor
    scale: torch.Tensor


DEFAULT_SCALAR_LAMBDA = 0.5  # normalised units; the best single λ on the validation split (docs/evaluation.md)


def data_scale(zero_filled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalisation factor per batch item, ``(B,)``: ‖Aᴴy‖ / √M with M the number of measured k-space locations.
    For a single coil ‖Aᴴy‖ = ‖y‖, so this is the RMS of the measured samples (the paper's k-space
    normalisation); for several coils it uses the coil-combined energy, so the scale does not depend on the coil
    count."""
    count = mask.expand(zero_filled.shape).sum(dim=(-2, -1)) if mask.ndim == 2 else mask.sum(dim=(-2, -1))
    energy = zero_filled.abs().pow(2).sum(dim=(-2, -1))
    return (energy / count.clamp_min(1)).sqrt().clamp_min(1e-12)


class CDLLambda(nn.Module):
    """The CDL-Λ reconstruction. ``lambda_net=None`` gives the classical baseline with one scalar λ for all
    filters and pixels (``scalar_lambda``, in normalised units). ``compiled`` fuses the FISTA element-wise work
    with ``torch.compile`` where no gradient is built (a one-off compile of seconds per image size)."""

    def __init__(self, lambda_net: LambdaNet | None = None, beta: float = 1.0, iterations: int = 64,
                 grad_iterations: int = 8, step_factor: float = 0.99, inertia: float = 3.0,
                 scalar_lambda: float = DEFAULT_SCALAR_LAMBDA, compiled: bool = False):
        super().__init__()
        if not 0 < step_factor < 1:
            raise ValueError(f"step_factor must be in (0, 1), got {step_factor}")
        self.lambda_net = lambda_net
        self.split = LowPassSplit(beta)
        self.iterations = iterations
        self.grad_iterations = grad_iterations
        self.step_factor = step_factor
        self.inertia = inertia
        self.scalar_lambda = scalar_lambda
        self.compiled = compiled

    def lambda_maps(self, x0_centred: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
        """Λ ``(B, K, ny, nx)`` from the normalised zero-filled image (centred layout)."""
        if self.lambda_net is None:
            b, (ny, nx) = x0_centred.shape[0], x0_centred.shape[-2:]
            return torch.full((b, dictionary.num_filters, ny, nx), float(self.scalar_lambda),
                              device=x0_centred.device)
        return self.lambda_net(x0_centred, dictionary)

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, dictionary: Dictionary,
                coil_maps: torch.Tensor | None = None, iterations: int | None = None,
                grad_iterations: int | None = None) -> ReconOutput:
        """kspace: complex centred ``(B, ny, nx)`` (single coil) or ``(B, C, ny, nx)`` with ``coil_maps`` of the
        same shape; mask: ``(ny, nx)`` or ``(B, ny, nx)``; returns :class:`ReconOutput`."""
        iterations = self.iterations if iterations is None else iterations
        grad_iterations = self.grad_iterations if grad_iterations is None else grad_iterations
        multi = coil_maps is not None
        if kspace.ndim != (4 if multi else 3):
            raise ValueError(f"k-space must be {'(B, C, ny, nx) with coil maps' if multi else '(B, ny, nx)'}, "
                             f"got shape {tuple(kspace.shape)}")
        if not kspace.is_complex():
            raise ValueError(f"k-space must be complex, got {kspace.dtype}")
        mask = mask.to(device=kspace.device, dtype=kspace.real.dtype)
        native_mask = _fft.to_native(mask)
        maps = _fft.to_native(coil_maps.to(kspace.dtype)) if multi else None
        op = make_operator(native_mask, maps, centred=False)
        y = _fft.to_native(kspace)
        x0 = op.adjoint(y)
        scale = data_scale(x0, mask)
        x0 = x0 / scale[:, None, None]
        y = y / scale.view(-1, *(1,) * (y.ndim - 1))
        x_low = self.split(x0)
        residual_data = y - op.forward(x_low)
        b_hat = residual_data if not multi else _fft.fft2(op.adjoint(residual_data))

        x0_centred = _fft.from_native(x0)
        lam = self.lambda_maps(x0_centred, dictionary).to(x0.real.dtype)
        lam_native = _fft.to_native(lam)

        shape = tuple(x0.shape[-2:])
        d_hat = dictionary.spectra(shape, x0.device, x0.dtype)
        step = self.step_factor / dictionary.lipschitz(shape)

        step_conj = step * d_hat.conj()

        def forward_step(z: torch.Tensor) -> torch.Tensor:
            """z − τ Dᴴ Aᴴ(A D z − y′), computed as F⁻¹(ẑ − τ d̂ᴴ (F AᴴA D z − b̂)) in the Fourier domain."""
            z_hat = _fft.fft2(z)
            residual = op.normal_fourier(dictionary.synthesize_fourier(z_hat)) - b_hat
            return _fft.ifft2(torch.addcmul(z_hat, residual.unsqueeze(1), step_conj, value=-1))

        codes0 = torch.zeros(x0.shape[0], dictionary.num_filters, *shape, dtype=x0.dtype, device=x0.device)
        codes = fista(forward_step, step * lam_native, codes0, iterations, grad_iterations, self.inertia,
                      compiled=self.compiled)
        image = x_low + _fft.ifft2(dictionary.synthesize_fourier(_fft.fft2(codes)))

        rescale = scale[:, None, None]
        return ReconOutput(image=_fft.from_native(image) * rescale, zero_filled=x0_centred * rescale,
                           low_pass=_fft.from_native(x_low) * rescale, lambda_maps=lam, scale=scale)
