"""Training losses on complex images ``(B, ny, nx)`` against their targets.

* :func:`relative_squared_error` — ‖x − x_true‖² / ‖x_true‖² per image (real and imaginary parts), batch mean: every
  SNR and coil count weighs the same.
* :func:`ssim` — differentiable SSIM of the magnitudes, the evaluation's definition (:func:`lab.metrics.ssim`:
  7 × 7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance N/(N − 1), only where the window fits,
  ``data_range`` the target's maximum), batch mean.
* :func:`image_loss` — relative squared error + w · (1 − SSIM). With w = 0 it is the squared error alone; a w > 0
  also rewards structure, which squared error weighs little in the dark background and at edges.
* :func:`background_loss` — binary cross-entropy of a background weight b (:mod:`recon.background`) against the
  target's background: farther than :data:`BACKGROUND_MARGIN` pixels from anything of the object, where the object
  is every pixel above :data:`OBJECT_FRACTION` of the target's 99th percentile (closed, holes filled,
  :func:`lab.metrics.foreground_mask`). The threshold is far below the evaluation's anatomy mask (0.1): tissue
  that is dim but present is object, never background, whatever its intensity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cdl_lambda.lab.metrics import foreground_mask

K1, K2, WINDOW = 0.01, 0.03, 7


def relative_squared_error(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    error = (image - target).abs().pow(2).sum(dim=(-2, -1))
    return (error / target.abs().pow(2).sum(dim=(-2, -1)).clamp_min(1e-30)).mean()


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| with a finite gradient at 0."""
    if not x.is_complex():
        return x.abs()
    return (x.real.pow(2) + x.imag.pow(2) + 1e-20).sqrt()


def ssim(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x, y = _magnitude(target)[:, None], _magnitude(image)[:, None]
    data_range = x.amax(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-30)
    x, y = x / data_range, y / data_range
    mean = lambda z: F.avg_pool2d(z, WINDOW, stride=1)  # noqa: E731 - the window average, named once
    n = WINDOW * WINDOW
    ux, uy = mean(x), mean(y)
    vx = (mean(x * x) - ux * ux) * n / (n - 1)
    vy = (mean(y * y) - uy * uy) * n / (n - 1)
    vxy = (mean(x * y) - ux * uy) * n / (n - 1)
    c1, c2 = K1 ** 2, K2 ** 2
    smap = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return smap.mean(dim=(-3, -2, -1)).mean()


def image_loss(image: torch.Tensor, target: torch.Tensor, ssim_weight: float = 0.0) -> torch.Tensor:
    loss = relative_squared_error(image, target)
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - ssim(image, target))
    return loss


BACKGROUND_MARGIN = 2    # pixels of the object's surroundings never counted as background
OBJECT_FRACTION = 0.01   # of the 99th percentile: anything brighter is object


def background_target(target: torch.Tensor) -> torch.Tensor:
    """1 where the target ``(B, ny, nx)`` holds no object (farther than the margin from its anatomy), else 0;
    float."""
    anatomy = foreground_mask(target.detach().abs().cpu().numpy(), fraction=OBJECT_FRACTION)
    far = np.stack([ndimage.distance_transform_edt(~a) > BACKGROUND_MARGIN for a in anatomy])
    return torch.from_numpy(far).to(device=target.device, dtype=target.real.dtype)


def background_loss(background: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the background weight ``(B, ny, nx)`` in (0, 1) against :func:`background_target`."""
    return F.binary_cross_entropy(background.clamp(1e-6, 1 - 1e-6), background_target(target))
