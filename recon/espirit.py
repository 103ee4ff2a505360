"""ESPIRiT coil sensitivities (Uecker et al., MRM 2014), in torch.

1. Calibration matrix: every ``kernel × kernel`` window of the fully sampled calibration block, all coils, one row
   per window position: ``(windows, coils·kernel²)``.
2. Its right singular vectors V_r with σ_r above a threshold span the signal subspace (the "kernels").
3. In the image domain the projection onto that subspace is, at each pixel x, the ``coils × coils`` matrix
   W(x) = (1/kernel²) Σ_r g_r(x) g_r(x)ᴴ with g_r(x) the zero-padded inverse DFT of kernel r. W(x) is a
   trigonometric polynomial of degree < 2·kernel, so it is formed exactly from the kernels' auto-correlation
   (``(2·kernel − 1)²`` coefficients per coil pair) with C² inverse FFTs of the image size: no per-kernel FFTs.
4. The sensitivities are the eigenvectors of W(x) with eigenvalue ≈ 1; where the largest eigenvalue falls below
   ``crop`` (no signal: background) the maps are set to zero, so the background is not reconstructed from noise.

Normalisation: Σ_j |c_j(x)|² = 1 where the eigenvalue ≥ ``crop`` and 0 elsewhere; the phase is relative to the
coil with the largest energy (the maps are smooth across the image). Shapes: k-space ``(coils, ny, nx)`` centred.
"""

from __future__ import annotations

import torch

from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.noise import noise_level

CALIBRATION_SIZE = 24  # rows and readout columns of the calibration block, at most (BART ecalib's default)


def calibration_block(kspace: torch.Tensor, calibration_mask: torch.Tensor,
                      size: int = CALIBRATION_SIZE) -> torch.Tensor:
    """The fully sampled centred block ``(coils, rows, cols)`` of k-space: the calibrated rows (a contiguous run
    through the centre), at most ``size`` of them nearest the centre, and ``size`` readout columns around the
    centre (BART ``ecalib``'s calibration region, ``-r 24``). Capped because a fully sampled scan would otherwise
    calibrate on all of k-space: its noise-dominated outer rows lower the eigenvalues inside the object, and at
    low SNR the crop then removes anatomy."""
    rows = torch.nonzero(calibration_mask.amax(dim=-1) > 0).flatten()
    if rows.numel() == 0:
        raise ValueError("no calibration lines: cannot estimate coil sensitivities")
    lo, hi = int(rows.min()), int(rows.max()) + 1
    ny, nx = kspace.shape[-2:]
    lo = max(lo, min(ny // 2 - size // 2, hi - size))
    hi = min(hi, lo + size)
    width = min(nx, size)
    x0 = nx // 2 - width // 2
    return kspace[..., lo:hi, x0:x0 + width]


def calibration_matrix(block: torch.Tensor, kernel: int) -> torch.Tensor:
    """Rows: the ``kernel²·coils`` values of one window of ``block`` ``(coils, ry, rx)``."""
    windows = block.unfold(-2, kernel, 1).unfold(-2, kernel, 1)  # (C, wy, wx, k, k)
    c = block.shape[0]
    return windows.permute(1, 2, 0, 3, 4).reshape(-1, c * kernel * kernel)


def espirit_operator(kernels: torch.Tensor, shape: tuple[int, int], centred: bool = True) -> torch.Tensor:
    """W(x) ``(ny, nx, C, C)`` (contiguous) from kernels ``(r, C, k, k)`` (rows of Vᴴ reshaped), exactly, via
    auto-correlation; pixels in the centred layout, or with ``centred=False`` in the native FFT layout (no shift of
    the C² planes: a caller that works pixel by pixel shifts its C-plane result once instead)."""
    r, c, k, _ = kernels.shape
    ny, nx = shape
    # A[c1, c2, Δ] = (1/k²) Σ_r Σ_o v_r[c1, o] conj(v_r[c2, o − Δ]) for Δ ∈ [−(k−1), k−1]²: a cross-correlation
    # over the window offsets, summed over r (conv2d's input channels), computed on real and imaginary parts.
    v = kernels.permute(1, 0, 2, 3)  # (C, r, k, k)
    padded = torch.nn.functional.pad(v, (k - 1, k - 1, k - 1, k - 1))
    conv = torch.nn.functional.conv2d
    acr = conv(padded.real, v.real) + conv(padded.imag, v.imag)  # (C, C, 2k−1, 2k−1)
    aci = conv(padded.imag, v.real) - conv(padded.real, v.imag)
    auto = torch.complex(acr, aci) / (k * k)  # indexed [c1, c2, Δ + (k−1)]
    # W(x) = Σ_Δ A[Δ] e^{…}: an (unnormalised) inverse DFT of the coefficient grid, built in the native layout
    # (coefficient Δ at index Δ mod n, which is what ifftshift makes of the centred grid)
    grid = torch.zeros(c, c, ny, nx, dtype=auto.dtype, device=auto.device)
    offsets = torch.arange(-(k - 1), k, device=auto.device)
    grid[:, :, (offsets % ny)[:, None], (offsets % nx)[None, :]] = auto
    w = _fft.ifft2(grid) * (ny * nx) ** 0.5
    if centred:
        w = _fft.from_native(w)
    return w.permute(2, 3, 0, 1).contiguous()


def right_singular_vectors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and right singular vectors (rows of Vᴴ) of a ``(m, n)`` matrix, from the
    eigen-decomposition of the smaller Gram matrix (several times faster than an SVD for these shapes; float64)."""
    m, n = matrix.shape
    if m >= n:
        eigval, eigvec = torch.linalg.eigh(matrix.conj().T @ matrix)
        order = eigval.flip(0).clamp_min(0).sqrt(), eigvec.flip(1)
        return order[0], order[1].conj().T
    eigval, u = torch.linalg.eigh(matrix @ matrix.conj().T)
    sv, u = eigval.flip(0).clamp_min(0).sqrt(), u.flip(1)
    vh = (u.conj().T @ matrix) / sv.clamp_min(1e-300)[:, None]
    return sv, vh


def dominant_eigenvector(w: torch.Tensor, iterations: int = 16,
                         normalise_every: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue and its unit eigenvector of Hermitian ``w`` ``(..., C, C)`` by power iteration from
    w·1. Where the object is, the ESPIRiT eigenvalue 1 is well separated from the next, so a few steps suffice;
    where the eigenvalues are close there is no signal and the maps are cropped anyway. The eigenvalues lie in
    [0, 1], so the iterate is rescaled only every ``normalise_every`` steps (the direction is the same; only pixels
    without signal, cropped anyway, can shrink towards 0)."""
    w = w.contiguous()  # a strided batch would be copied by every product
    vec = w.sum(dim=-1, keepdim=True)
    vec = vec / vec.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    for step in range(1, iterations + 1):
        vec = w @ vec
        if step % normalise_every == 0 or step == iterations:
            vec = vec / vec.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    value = (vec.conj().transpose(-1, -2) @ w @ vec).real[..., 0, 0]
    return value, vec[..., 0]


def espirit(kspace: torch.Tensor, calibration_mask: torch.Tensor, noise_std: float | None = None, kernel: int = 6,
            threshold: float = 0.02, crop: float = 0.8, iterations: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """ESPIRiT sensitivities ``(coils, ny, nx)`` complex64 and the eigenvalue map ``(ny, nx)`` float32 from centred
    ``kspace`` ``(coils, ny, nx)`` and its ``calibration_mask`` ``(ny, nx)``.

    Kernels: singular vectors with σ ≥ ``threshold``·σ_max and σ ≥ 1.5·σ_n·(√rows + √cols), above the largest
    singular value that noise alone would give a matrix of that size (σ_n = ``noise_std``, the std of the complex
    noise per sample: 1 after prewhitening; None: estimated from the data, :mod:`recon.noise`). This noise floor is
    what keeps the maps clean at low SNR. ``crop``: eigenvalue below which a pixel has no signal (maps 0 there)."""
    c, ny, nx = kspace.shape
    kspace = kspace.to(torch.complex64)
    if noise_std is None:
        noise_std = float(noise_level(kspace, calibration_mask)[0])
    block = calibration_block(kspace, calibration_mask)
    if min(block.shape[-2:]) < kernel + 2:
        raise ValueError(f"calibration block of {block.shape[-2]}×{block.shape[-1]} samples is too small for "
                         f"{kernel}×{kernel} ESPIRiT kernels")
    matrix = calibration_matrix(block, kernel).to(torch.complex128)
    sv, vh = right_singular_vectors(matrix)
    keep = (sv >= threshold * sv[0]) & (sv >= 1.5 * noise_std * (matrix.shape[0] ** 0.5 + matrix.shape[1] ** 0.5))
    rank = max(int(keep.sum()), 1)
    kernels = vh[:rank].reshape(rank, c, kernel, kernel)
    # pixel by pixel in the native layout; the (C, ny, nx) result is shifted to the centred one at the end
    value, maps = dominant_eigenvector(espirit_operator(kernels, (ny, nx), centred=False), iterations)
    reference = maps.abs().pow(2).sum(dim=(0, 1)).argmax()
    ref = maps[..., reference]
    maps = maps * (ref.conj() / ref.abs().clamp_min(1e-12))[..., None]
    maps = maps * (value >= crop)[..., None]
    maps, value = _fft.from_native(maps.permute(2, 0, 1)), _fft.from_native(value)
    return maps.to(torch.complex64).contiguous(), value.to(torch.float32)


def espirit_maps(kspace: torch.Tensor, calibration_mask: torch.Tensor, noise_std: float | None = None,
                 **options) -> torch.Tensor:
    """The sensitivities of :func:`espirit` alone."""
    return espirit(kspace, calibration_mask, noise_std, **options)[0]
