"""Cartesian MRI forward operators A, their adjoints Aᴴ and normal operators AᴴA.

* single coil: ``A x = S F x``            image ``(..., ny, nx)`` → k-space ``(..., ny, nx)``
* multi coil:  ``A x = S F (C x)``        image ``(..., ny, nx)`` → k-space ``(..., coils, ny, nx)``

F is the orthonormal 2-D DFT, S a binary mask (broadcast over leading axes and coils), C the coil sensitivities,
normalised so that Σ_j |c_j|² ≤ 1; then ‖A‖ ≤ 1. With ``centred=True`` (default) inputs are in the centred layout
(:func:`recon.fft.fft2c`); ``centred=False`` means the native FFT layout the solvers use inside their loops.

``normal_fourier(u)`` applies F AᴴA Fᴴ to an image spectrum ``u``: for a single coil it is just ``S u`` (no FFT at
all), which is what makes the single-coil CDL-Λ iteration cost only the 2K dictionary FFTs.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * self._f(self.coil_maps * x.unsqueeze(-3))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (self.coil_maps.conj() * self._fi(self.mask * y)).sum(dim=-3)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.forward(x))

    def normal_fourier(self, u: torch.Tensor) -> torch.Tensor:
        """F AᴴA Fᴴ u: 2C + 2 FFTs."""
        return self._f(self.normal(self._fi(u)))


def make_operator(mask: torch.Tensor, coil_maps: torch.Tensor | None = None, centred: bool = True):
    """Single-coil operator when ``coil_maps`` is None, multi-coil otherwise."""
    if coil_maps is None:
        return SingleCoilOperator(mask, centred=centred)
    return MultiCoilOperator(mask, coil_maps, centred=centred)
