"""Image-quality metrics on magnitude images: a thin layer over scikit-image and scipy that adds what fastMRI-style
evaluation needs (volume-wide data range, masks, slice averaging).

* :func:`ssim` — ``skimage.metrics.structural_similarity`` with its defaults (7×7 uniform window, K1 = 0.01,
  K2 = 0.03, sample covariance N/(N − 1), statistics only where the window fits, i.e. a 3-pixel border is cropped)
  and ``data_range`` = the maximum of the whole target *volume*, as fastMRI computes it; averaged over slices. With a
  mask, the SSIM map is averaged over the masked pixels (of the cropped region) instead.
* :func:`psnr` — 10 log10(max² / MSE), max = the target volume's maximum (fastMRI).
* :func:`nmse` — ‖x − y‖² / ‖y‖² over the volume (or the masked pixels).
* :func:`blur_effect` — ``skimage.measure.blur_effect(image, h_size=11)``, the no-reference blur metric of
  Crété-Roffet et al. (2007): 0 is sharp, 1 is maximally blurred; with a mask, measured on the mask's bounding box.
* :func:`foreground_mask` — the "brain" mask used for masked metrics: the target magnitude above 10 % of its
  99th percentile, closed with a 7×7 window (``scipy.ndimage.binary_closing``) and holes filled
  (``scipy.ndimage.binary_fill_holes``).

All functions take magnitude arrays ``(slices, ny, nx)`` (or one ``(ny, nx)`` slice), numpy or torch; complex inputs
are reduced to their magnitude.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import blur_effect as _skimage_blur_effect
from skimage.metrics import structural_similarity


def _magnitude(x) -> np.ndarray:
    """float64 magnitude ``(slices, ny, nx)`` of a numpy array or torch tensor (real or complex)."""
    x = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    x = np.abs(x) if np.iscomplexobj(x) else x
    x = x.astype(np.float64)
    return x[None] if x.ndim == 2 else x


def ssim_map(target, image, data_range: float, win_size: int = 7, k1: float = 0.01,
             k2: float = 0.03) -> np.ndarray:
    """SSIM at every pixel where the window fits: ``(slices, ny − win + 1, nx − win + 1)``."""
    x, y = _magnitude(target), _magnitude(image)
    pad = (win_size - 1) // 2
    maps = [structural_similarity(a, b, win_size=win_size, data_range=data_range, K1=k1, K2=k2, full=True)[1]
            for a, b in zip(x, y)]
    return np.stack(maps)[:, pad:x.shape[-2] - pad, pad:x.shape[-1] - pad]


def ssim(target, image, mask=None, win_size: int = 7) -> float:
    """Mean SSIM over slices, ``data_range`` = target volume maximum; with ``mask`` (same shape as the slices) the
    map is averaged over the masked pixels of the region where the window fits (slices with none are skipped)."""
    x = _magnitude(target)
    smap = ssim_map(x, image, float(x.max()), win_size)
    if mask is None:
        return float(smap.mean(axis=(-2, -1)).mean())
    pad = (win_size - 1) // 2
    m = _magnitude(mask)[..., pad:pad + smap.shape[-2], pad:pad + smap.shape[-1]] > 0
    per_slice = [s[k].mean() for s, k in zip(smap, m) if k.any()]
    return float(np.mean(per_slice))


def psnr(target, image, mask=None) -> float:
    """10 log10(max² / MSE), max = the target volume's maximum; MSE over the masked pixels when ``mask`` is given."""
    x, y = _magnitude(target), _magnitude(image)
    err = (x - y) ** 2
    mse = err[_magnitude(mask) > 0].mean() if mask is not None else err.mean()
    return float(10 * np.log10(x.max() ** 2 / max(mse, 1e-30)))


def nmse(target, image, mask=None) -> float:
    """‖x − y‖² / ‖x‖² (x the target) over the volume or the masked pixels."""
    x, y = _magnitude(target), _magnitude(image)
    if mask is not None:
        keep = _magnitude(mask) > 0
        x, y = x[keep], y[keep]
    return float(((x - y) ** 2).sum() / max((x ** 2).sum(), 1e-30))


def blur_effect_slice(image, h_size: int = 11) -> float:
    """Crété-Roffet blur effect of one 2-D magnitude image (0 sharp … 1 blurred)."""
    return float(_skimage_blur_effect(_magnitude(image)[0], h_size=h_size))


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


def foreground_mask(target, fraction: float = 0.1, closing: int = 7) -> np.ndarray:
    """Boolean anatomy mask ``(slices, ny, nx)`` of the target's magnitude: above ``fraction`` × its 99th percentile,
    closed with a ``closing`` × ``closing`` square (the image counts as zero outside its border), holes filled."""
    x = _magnitude(target)
    square = np.ones((closing, closing), dtype=bool)
    out = np.zeros(x.shape, dtype=bool)
    for i, image in enumerate(x):
        m = np.pad(image > fraction * np.percentile(image, 99), closing)
        m = ndimage.binary_closing(m, structure=square)[closing:-closing, closing:-closing]
        out[i] = ndimage.binary_fill_holes(m)
    return out


def all_metrics(target, image, mask=None) -> dict[str, float]:
    """SSIM, PSNR, NMSE (masked when ``mask`` is given) and the blur effect of ``image``."""
    return {"ssim": ssim(target, image, mask), "psnr": psnr(target, image, mask), "nmse": nmse(target, image, mask),
            "blur": blur_effect(image, mask)}
