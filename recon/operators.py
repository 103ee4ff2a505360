"""Cartesian MRI forward operators A, their adjoints Aᴴ and normal operators AᴴA.

* single coil: ``A x = S F x``            image ``(..., ny, nx)`` → k-space ``(..., ny, nx)``
* multi coil:  ``A x = S F (C x)``        image ``(..., ny, nx)`` → k-space ``(..., coils, ny, nx)``

F is the orthonormal 2-D DFT, S a binary mask (broadcast over leading axes and coils), C the coil sensitivities,
normalised so that Σ_j |c_j|² ≤ 1; then ‖A‖ ≤ 1. With ``centred=True`` (default) inputs are in the centred layout
(:func:`recon.fft.fft2c`); ``centred=False`` means the native FFT layout the solvers use inside their loops.

``normal_fourier(u)`` applies F AᴴA Fᴴ to an image spectrum ``u``: for a single coil it is just ``S u`` (no FFT at
all), which is what makes the single-coil CDL-Λ iteration cost only the 2K dictionary FFTs.

Multi-coil normal operator AᴴA = Σ_j c̄_j F⁻¹ S F c_j, with two exact shortcuts chosen once from the mask:

* S = 1 (fully sampled): F⁻¹ F = I, so AᴴA x = (Σ_j |c_j|²) x, no FFT;
* S constant along the readout (Cartesian phase-encoding lines, every sample of a line measured): S = S_y ⊗ 1 commutes
  with the readout DFT F_x, so F⁻¹ S F = F_y⁻¹ S_y F_y and each coil needs two 1-D FFTs along the phase-encoding
  axis instead of two 2-D FFTs.
"""

from __future__ import annotations

import torch

from cdl_lambda.recon import fft as _fft


class SingleCoilOperator:
    """``A = S F``. ``mask``: ``(..., ny, nx)``, broadcastable against the images."""

    def __init__(self, mask: torch.Tensor, centred: bool = True):
        self.mask = mask
        self.centred = centred
        self._f = _fft.fft2c if centred else _fft.fft2
        self._fi = _fft.ifft2c if centred else _fft.ifft2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * self._f(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._fi(self.mask * y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return self._fi(self.mask * self._f(x))

    def normal_fourier(self, u: torch.Tensor) -> torch.Tensor:
        """F AᴴA Fᴴ u = S u (S is binary so S² = S). Valid in the layout this operator was built for."""
        return self.mask * u


class MultiCoilOperator:
    """``A = S F C``. ``mask``: ``(..., ny, nx)`` (shared by all coils); ``coil_maps``: ``(..., coils, ny, nx)``."""

    def __init__(self, mask: torch.Tensor, coil_maps: torch.Tensor, centred: bool = True):
        self.mask = mask.unsqueeze(-3)
        self.coil_maps = coil_maps
        self.centred = centred
        self._f = _fft.fft2c if centred else _fft.fft2
        self._fi = _fft.ifft2c if centred else _fft.ifft2
        # the normal operator's shortcut (module docstring): "full", "lines" (S_y along axis −2) or "2d"
        binary = bool(((mask == 0) | (mask == 1)).all())
        if binary and bool((mask == 1).all()):
            self._normal_kind, self._sensitivity = "full", coil_maps.abs().pow(2).sum(dim=-3)
        elif binary and bool((mask == mask[..., :1]).all()):
            self._normal_kind, self._line_mask = "lines", self.mask[..., :1]
        else:
            self._normal_kind = "2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * self._f(self.coil_maps * x.unsqueeze(-3))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (self.coil_maps.conj() * self._fi(self.mask * y)).sum(dim=-3)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        if self._normal_kind == "full":
            return self._sensitivity * x
        if self._normal_kind == "lines":
            f, fi = (_fft.fft1c, _fft.ifft1c) if self.centred else (_fft.fft1, _fft.ifft1)
            coil_images = fi(self._line_mask * f(self.coil_maps * x.unsqueeze(-3), dim=-2), dim=-2)
            return (self.coil_maps.conj() * coil_images).sum(dim=-3)
        return self.adjoint(self.forward(x))

    def normal_fourier(self, u: torch.Tensor) -> torch.Tensor:
        """F AᴴA Fᴴ u: 2 FFTs and the normal operator (2C 2-D FFTs, 2C 1-D ones for line masks, none at S = 1)."""
        return self._f(self.normal(self._fi(u)))


def make_operator(mask: torch.Tensor, coil_maps: torch.Tensor | None = None, centred: bool = True):
    """Single-coil operator when ``coil_maps`` is None, multi-coil otherwise."""
    if coil_maps is None:
        return SingleCoilOperator(mask, centred=centred)
    return MultiCoilOperator(mask, coil_maps, centred=centred)
