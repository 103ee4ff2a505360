"""CDL-Λ: (PH) low-pass split → NET_Θ infers Λ → FISTA on the weighted convolutional synthesis problem (PR).

    x_L = argmin_x ½‖A x − y‖² + (β/2)‖∇x‖²,   y′ = y − A x_L,
    s* = argmin_s ½‖A D s − y′‖² + Σ_k ‖Λ_k ⊙ Re s_k‖₁ + ‖Λ_k ⊙ Im s_k‖₁,   x* = x_L + D s*.

For a single coil x_L is the paper's (I + β∇ᴴ∇)⁻¹Aᴴy exactly; for several coils it is the data-consistent
generalisation solved by conjugate gradients (:mod:`recon.lowpass`), so that aliasing of undersampled data does not
survive into x_L.

Units: the data are divided by the noise level σ (the std of the complex noise per k-space sample: 1 after
prewhitening with a noise scan, else estimated, :mod:`recon.noise`), so y, x₀ = Aᴴy, Λ, the scalar λ and the
network's inputs are all in units of the noise; one network then serves any SNR. The output is scaled back to the
input's units. The final data residual relative to the noise, ‖A x* − y‖ / (σ √M) over the M measured samples
(all coils), is returned as a ground-truth-free check: about 1 when the fit stops at the noise, well above 1 when
Λ over-regularises.

For several coils the coil maps are support-cropped (zero outside the object): the image is zero there
(x* ⊙ 1[Σ|c|² > 0]) rather than reconstructed from noise.

One FISTA gradient costs 2K FFTs (codes ↔ Fourier) plus 2C + 2 for a C-coil operator (none for a single coil,
where A D s = S Σ_k d̂_k ŝ_k directly in k-space). Step τ = c / L with L = max_ω Σ_k |d̂_k(ω)|² ≥ ‖A D‖².
Inputs and outputs use the centred layout; internally everything runs in the native FFT layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.lambda_nets import LambdaNet
from cdl_lambda.recon.lowpass import LowPassSplit
from cdl_lambda.recon.noise import estimate_noise_std
from cdl_lambda.recon.operators import make_operator
from cdl_lambda.recon.solvers import fista


@dataclass
class ReconOutput:
    """Centred-layout results in the units of the input (Λ in noise units). Shapes (B, ny, nx) / (B, K, ny, nx);
    noise_std and residual_to_noise ``(B,)``."""

    image: torch.Tensor
    zero_filled: torch.Tensor
    low_pass: torch.Tensor
    lambda_maps: torch.Tensor
    noise_std: torch.Tensor
    residual_to_noise: torch.Tensor


DEFAULT_SCALAR_LAMBDA = 1.0  # noise units; with β = DEFAULT_SCALAR_BETA the best pair on the validation split
DEFAULT_SCALAR_BETA = 3.0
NETWORK_INPUT_SCALE = 0.25   # the network sees x₀ / (4σ): inputs of a few units at SNR 5–50


class CDLLambda(nn.Module):
    """The CDL-Λ reconstruction. ``lambda_net=None`` gives the classical baseline with one scalar λ for all
    filters and pixels (``scalar_lambda``, in noise units). ``cg_iterations``: conjugate-gradient steps of the
    multi-coil low-pass part. ``compiled`` fuses the FISTA element-wise work with ``torch.compile`` where no
    gradient is built."""

    def __init__(self, lambda_net: LambdaNet | None = None, beta: float = 1.0, iterations: int = 64,
                 grad_iterations: int = 8, step_factor: float = 0.99, inertia: float = 3.0,
                 scalar_lambda: float = DEFAULT_SCALAR_LAMBDA, cg_iterations: int = 12, compiled: bool = False):
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
        self.cg_iterations = cg_iterations
        self.compiled = compiled

    def lambda_maps(self, x0_centred: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
        """Λ ``(B, K, ny, nx)`` in noise units from the zero-filled image in noise units (centred layout)."""
        if self.lambda_net is None:
            b, (ny, nx) = x0_centred.shape[0], x0_centred.shape[-2:]
            return torch.full((b, dictionary.num_filters, ny, nx), float(self.scalar_lambda),
                              device=x0_centred.device)
        return self.lambda_net(x0_centred * NETWORK_INPUT_SCALE, dictionary)

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, dictionary: Dictionary,
                coil_maps: torch.Tensor | None = None, noise_std: torch.Tensor | float | None = None,
                iterations: int | None = None, grad_iterations: int | None = None) -> ReconOutput:
        """kspace: complex centred ``(B, ny, nx)`` (single coil) or ``(B, C, ny, nx)`` with ``coil_maps`` of the
        same shape; mask ``(ny, nx)`` or ``(B, ny, nx)``; noise_std: σ per batch item (None: estimated)."""
        iterations = self.iterations if iterations is None else iterations
        grad_iterations = self.grad_iterations if grad_iterations is None else grad_iterations
        multi = coil_maps is not None
        if kspace.ndim != (4 if multi else 3):
            raise ValueError(f"k-space must be {'(B, C, ny, nx) with coil maps' if multi else '(B, ny, nx)'}, "
                             f"got shape {tuple(kspace.shape)}")
        if not kspace.is_complex():
            raise ValueError(f"k-space must be complex, got {kspace.dtype}")
        batch = kspace.shape[0]
        mask = mask.to(device=kspace.device, dtype=kspace.real.dtype)
        if noise_std is None:
            sample_mask = mask if mask.ndim == 2 else mask[0]
            noise_std = estimate_noise_std(kspace if multi else kspace.unsqueeze(1), sample_mask)
        sigma = torch.as_tensor(noise_std, dtype=kspace.real.dtype, device=kspace.device).reshape(-1)
        sigma = sigma.expand(batch).clamp_min(torch.finfo(sigma.dtype).tiny)

        native_mask = _fft.to_native(mask)
        maps = _fft.to_native(coil_maps.to(kspace.dtype)) if multi else None
        op = make_operator(native_mask, maps, centred=False)
        y = _fft.to_native(kspace) / sigma.view(-1, *(1,) * (kspace.ndim - 1))
        x0 = op.adjoint(y)
        if multi:
            x_low = self.split.data_consistent(op, x0, self.cg_iterations)
        else:
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

        codes0 = torch.zeros(batch, dictionary.num_filters, *shape, dtype=x0.dtype, device=x0.device)
        codes = fista(forward_step, step * lam_native, codes0, iterations, grad_iterations, self.inertia,
                      compiled=self.compiled)
        image = x_low + _fft.ifft2(dictionary.synthesize_fourier(_fft.fft2(codes)))
        if multi:
            support = (maps.abs().pow(2).sum(dim=-3) > 0).to(image.real.dtype)
            image, x_low = image * support, x_low * support
        with torch.no_grad():
            residual = op.forward(image) - y
            measured = op.mask.expand(y.shape).sum(dim=tuple(range(1, y.ndim))).clamp_min(1)
            ratio = (residual.abs().pow(2).sum(dim=tuple(range(1, y.ndim))) / measured).sqrt()

        rescale = sigma[:, None, None]
        return ReconOutput(image=_fft.from_native(image) * rescale, zero_filled=x0_centred * rescale,
                           low_pass=_fft.from_native(x_low) * rescale, lambda_maps=lam, noise_std=sigma,
                           residual_to_noise=ratio)
