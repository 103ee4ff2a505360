"""Image-quality metrics on magnitude images, in numpy, written to match the reference implementations.

* :func:`ssim` — SSIM as fastMRI computes it (``skimage.metrics.structural_similarity`` with its defaults:
  7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance N/(N − 1), statistics only where the window fits,
  i.e. a 3-pixel border is cropped) with ``data_range`` = the maximum of the whole target *volume*; averaged over
  slices. With a mask, the SSIM map is averaged over the masked pixels (of the cropped region) instead.
* :func:`psnr` — 10 log10(max² / MSE), max = the target volume's maximum (fastMRI).
* :func:`nmse` — ‖x − y‖² / ‖y‖² over the volume (or the masked pixels).
* :func:`blur_effect` — the no-reference blur metric of Crété-Roffet et al. (2007), as
  ``skimage.measure.blur_effect(image, h_size=11)``: per axis, B = |M1 − M2| / M1 with M1 = Σ|Sobel(x)|,
  M2 = Σ max(0, |Sobel(x)| − |Sobel(blur(x))|), blur an 11-tap moving average along that axis; the maximum over axes.
  0 is sharp, 1 is maximally blurred.
* :func:`foreground_mask` — the "brain" mask used for masked metrics: the target magnitude above 10 % of its
  99th percentile, closed with a 7×7 window and holes filled.

All functions take magnitude arrays ``(slices, ny, nx)`` (or one ``(ny, nx)`` slice); complex inputs are reduced to
their magnitude.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _magnitude(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    x = np.abs(x) if np.iscomplexobj(x) else x
    x = x.astype(np.float64)
    return x[None] if x.ndim == 2 else x


def _window_mean(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over every fully contained size×size window: ``(..., ny − size + 1, nx − size + 1)``."""
    c = np.cumsum(np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]), axis=-2), axis=-1)
    s = c[..., size:, size:] - c[..., :-size, size:] - c[..., size:, :-size] + c[..., :-size, :-size]
    return s / size ** 2


def ssim_map(target: np.ndarray, image: np.ndarray, data_range: float, win_size: int = 7,
             k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """SSIM at every pixel where the window fits: ``(slices, ny − win + 1, nx − win + 1)``."""
    x, y = _magnitude(target), _magnitude(image)
    mx, my = _window_mean(x, win_size), _window_mean(y, win_size)
    cov_norm = win_size ** 2 / (win_size ** 2 - 1)
    vx = cov_norm * (_window_mean(x * x, win_size) - mx * mx)
    vy = cov_norm * (_window_mean(y * y, win_size) - my * my)
    vxy = cov_norm * (_window_mean(x * y, win_size) - mx * my)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def ssim(target, image, mask=None, win_size: int = 7) -> float:
    """Mean SSIM over slices, ``data_range`` = target volume maximum; with ``mask`` (same shape as the slices) the
    map is averaged over the masked pixels of the region where the window fits."""
    x = _magnitude(target)
    smap = ssim_map(x, image, float(x.max()), win_size)
    pad = (win_size - 1) // 2
    if mask is None:
        return float(smap.mean(axis=(-2, -1)).mean())
    m = _magnitude(mask)[..., pad:pad + smap.shape[-2], pad:pad + smap.shape[-1]] > 0
    per_slice = [s[k].mean() for s, k in zip(smap, m) if k.any()]
    return float(np.mean(per_slice))


def psnr(target, image, mask=None) -> float:
    x, y = _magnitude(target), _magnitude(image)
    err = (x - y) ** 2
    mse = err[_magnitude(mask) > 0].mean() if mask is not None else err.mean()
    return float(10 * np.log10(x.max() ** 2 / max(mse, 1e-30)))


def nmse(target, image, mask=None) -> float:
    x, y = _magnitude(target), _magnitude(image)
    if mask is not None:
        keep = _magnitude(mask) > 0
        x, y = x[keep], y[keep]
    return float(((x - y) ** 2).sum() / max((x ** 2).sum(), 1e-30))


def _sobel(x: np.ndarray, axis: int) -> np.ndarray:
    """skimage.filters.sobel(x, axis=axis) for a 2-D image: derivative [1, 0, −1] along ``axis``, smoothing
    [1, 2, 1]/4 along the other, symmetric ('reflect') borders."""
    p = np.pad(x, 1, mode="symmetric")
    d = (p[2:, :] - p[:-2, :]) if axis == 0 else (p[:, 2:] - p[:, :-2])
    d = d[:, 1:-1] if axis == 0 else d[1:-1, :]
    other = 1 - axis
    q = np.pad(d, [(1, 1) if a == other else (0, 0) for a in range(2)], mode="symmetric")
    if other == 0:
        return (q[:-2] + 2 * q[1:-1] + q[2:]) / 4
    return (q[:, :-2] + 2 * q[:, 1:-1] + q[:, 2:]) / 4


def _moving_average(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """scipy.ndimage.uniform_filter1d(x, size, axis) (odd ``size``, 'reflect' borders)."""
    half = size // 2
    pad = [(half, half) if a == axis else (0, 0) for a in range(x.ndim)]
    return sliding_window_view(np.pad(x, pad, mode="symmetric"), size, axis=axis).mean(axis=-1)


def blur_effect_slice(image, h_size: int = 11) -> float:
    """Crété-Roffet blur effect of one 2-D magnitude image (0 sharp … 1 blurred)."""
    x = _magnitude(image)[0]
    inner = (slice(2, x.shape[0] - 1), slice(2, x.shape[1] - 1))
    values = []
    for axis in (0, 1):
        sharp = np.abs(_sobel(x, axis))
        blurred = np.abs(_sobel(_moving_average(x, h_size, axis), axis))
        m1 = sharp[inner].sum()
        m2 = np.maximum(0.0, sharp - blurred)[inner].sum()
        values.append(abs(m1 - m2) / max(m1, 1e-30))
    return float(max(values))


def blur_effect(images, mask=None, h_size: int = 11) -> float:
    """Mean blur effect over slices. With ``mask``, each slice is cropped to the mask's bounding box first (the
    metric is global, so restricting it means measuring the anatomy, not the background)."""
    x = _magnitude(images)
    masks = _magnitude(mask) > 0 if mask is not None else [None] * len(x)
    values = []
    for image, m in zip(x, masks):
        if m is not None and m.any():
            rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
            image = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        values.append(blur_effect_slice(image, h_size))
    return float(np.mean(values))


def _box_max(m: np.ndarray, size: int) -> np.ndarray:
    """Dilation of a boolean image by a size×size square (zero outside)."""
    half = size // 2
    return sliding_window_view(np.pad(m, half), (size, size)).any(axis=(-2, -1))


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """Fill background regions not 4-connected to the image border."""
    outside = ~m
    reach = np.zeros_like(m)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1]
    while True:
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= outside
        if (grown == reach).all():
            return ~reach
        reach = grown


def foreground_mask(target, fraction: float = 0.1, closing: int = 7) -> np.ndarray:
    """Boolean anatomy mask ``(slices, ny, nx)`` of the target's magnitude (see the module docstring)."""
    x = _magnitude(target)
    out = np.zeros(x.shape, dtype=bool)
    for i, image in enumerate(x):
        m = np.pad(image > fraction * np.percentile(image, 99), closing)
        m = ~_box_max(~_box_max(m, closing), closing)  # closing = dilation then erosion
        out[i] = _fill_holes(m[closing:-closing, closing:-closing])
    return out


def all_metrics(target, image, mask=None) -> dict[str, float]:
    """SSIM, PSNR, NMSE (masked when ``mask`` is given) and the blur effect of ``image``."""
    return {"ssim": ssim(target, image, mask), "psnr": psnr(target, image, mask), "nmse": nmse(target, image, mask),
            "blur": blur_effect(image, mask)}
