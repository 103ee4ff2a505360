"""The background weight: where the field of view holds no object, both steps of CDL-Λ pull the image to zero.

Within the coil maps' support but outside the object, the truth is 0. (PH)'s smoothing spreads every edge of the
object into a halo outside it (decay length √β pixels), and the high-pass synthesis D s spills up to half a filter
beyond the edge. A low halo of 1 % of the maximum is invisible at a clinical window but decides SSIM in the
background, where total variation leaves exact zeros. A map b ∈ (0, 1), inferred from the zero-filled image by a
small U-Net, weights a quadratic penalty on the image in both steps:

    (PH)  x_L = argmin_x ½‖A x − y‖² + (β/2)‖∇x‖² + (γ_L/2)‖√b ⊙ x‖²
    (PR)  s* = argmin_s ½‖A(x_L + D s) − y‖² + (γ_R/2)‖√b ⊙ (x_L + D s)‖² + Σ_k ‖Λ_k ⊙ s_k‖₁

Both stay convex for any b ≥ 0: (PH) is solved by the same conjugate gradients with γ_L b added to the diagonal,
(PR)'s smooth part gains Dᴴ(γ_R b ⊙ x) in its gradient, and its Lipschitz constant at most (1 + γ_R)‖D‖². The gains
γ_L = softplus(·) and γ_R = softplus(·) are learned with the network; b = 0 gives CDL-Λ without the weight.
A quadratic pull leaves a little of the noise where b ≈ 1, and a flat region's SSIM counts errors far below 1 % of the
maximum, so the image shown is (1 − b) ⊙ (x_L + D s*).

That is the ``"penalty"`` form. In the ``"factor"`` form (:data:`FORMS`) (PR) puts the factor in the forward model
instead of the pull:

    (PR′) s* = argmin_s ½‖A((1 − b) ⊙ (x_L + D s)) − y‖² + Σ_k ‖Λ_k ⊙ s_k‖₁,

the image shown, (1 − b) ⊙ (x_L + D s*), is the one the data term fits, and since 0 ≤ 1 − b ≤ 1 the Lipschitz
constant stays ‖D‖²: FISTA keeps its full step where the penalty form divides it by 1 + γ_R (γ_R ≈ 2.7 once trained,
so the background pixels, not the anatomy, set the step). γ_R is unused in this form. The form is part of the network
(its ``config()``), since Λ is trained for the solve it runs in.

Where b is wrongly high on tissue, that tissue is darkened: x_L keeps about 1/(1 + γ_L) of it and the high-pass
D s cannot put a region's mean back. The weight is only as safe as b, so b is trained to call background nothing
brighter than 1 % of the image (lab.losses.background_loss), judged out of distribution on what it darkens
(bench/background_weight.py), and checked against the data for every image (:func:`data_disagreement`, on the image
shown, after the factor 1 − b): where the data show signal the weight removed, the image is reconstructed without it
and says so. That image keeps the weight's factor 1 − b where the data agree (:func:`kept_where_data_agree`): the
weight is withdrawn around every box where they disagree (fading back over a few pixels: no hard edge), the factor
applied to the weight-free image elsewhere, and the result checked again, so a knee whose dim edge b covered keeps
its clean background everywhere else.
b reads where the object ends from the anatomy's shape, so it is inferred at the scale it was trained at: an image
with more samples than that matrix is seen through the centre of its k-space (the same field of view in larger
pixels, :func:`on_coarser_grid`) and b interpolated back. Training solves a share of its batches without the weight
(``--background-dropout``), so that image, a withdrawn slice's, stays good.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from cdl_lambda.recon import fft as _fft

INITIAL_LOWPASS_GAIN = 10.0   # γ_L: (PH)'s weight, against AᴴA ≈ 1 and β∇ᴴ∇ ≤ 8β inside the support
INITIAL_IMAGE_GAIN = 2.0      # γ_R: (PR)'s weight; FISTA's step shrinks by 1 / (1 + γ_R)
WINDOW = 5                    # pixels: the box over which the data residual is averaged
WITHDRAW_Z = 5.5              # above this disagreement the weight is withdrawn (docs/site-safety.md says why)
DISAGREE_Z = 3.0              # a box above this is where the data disagree (pure noise: exp(−9) ≈ 1e-4 per pixel)
DISAGREE_MARGIN = 4           # pixels a disagreeing box is grown by before the weight is withdrawn there
FEATHER = 3                   # pixels (odd) beyond that margin over which the withdrawal fades out
DISAGREE_ROUNDS = 3           # times the withdrawn region may grow before the weight is withdrawn everywhere
INITIAL_LOGIT = -6.0          # b ≈ 0.0025 everywhere before training: the network starts as it was
FORMS = ("penalty", "factor")  # how (PR) uses b: the pull (γ_R/2)‖√b ⊙ x‖², or the factor 1 − b in the forward model
STEPS = ("uniform", "local")   # the penalty form's FISTA step: 1/((1 + γ_R)‖D‖²) everywhere, or per code pixel


def _softplus_inverse(value: float) -> float:
    return math.log(math.expm1(value))


class BackgroundWeight(nn.Module):
    """b = sigmoid(U([Re, Im] x₀)) ``(B, ny, nx)`` from the normalised zero-filled image, with the gains γ_L, γ_R.

    ``unet``: any 2 → 1 channel network (the Λ network's U-Net class); ``form``: how (PR) uses b (:data:`FORMS`);
    ``step``: the penalty form's FISTA step (:data:`STEPS`, :func:`local_curvature`). Both are part of the network, as Λ
    is trained for the solve it runs in."""

    def __init__(self, unet: nn.Module, form: str = "penalty", step: str = "uniform"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown background form {form!r}: one of {', '.join(FORMS)}")
        if step not in STEPS:
            raise ValueError(f"unknown background step {step!r}: one of {', '.join(STEPS)}")
        if step != "uniform" and form != "penalty":
            raise ValueError(f"the {step} step is for the penalty form (the {form} form keeps the full step)")
        self.unet = unet
        self.form, self.step = form, step
        nn.init.constant_(self.unet.head.bias, INITIAL_LOGIT)
        self.raw_lowpass_gain = nn.Parameter(torch.tensor(_softplus_inverse(INITIAL_LOWPASS_GAIN)))
        self.raw_image_gain = nn.Parameter(torch.tensor(_softplus_inverse(INITIAL_IMAGE_GAIN)))
        self.matrix: int | None = None  # the matrix b was trained at, set when a trained network is loaded

    @property
    def lowpass_gain(self) -> torch.Tensor:
        return F.softplus(self.raw_lowpass_gain)

    @property
    def image_gain(self) -> torch.Tensor:
        return F.softplus(self.raw_image_gain)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """b ``(B, ny, nx)`` in (0, 1) from complex ``x0`` ``(B, ny, nx)`` in the centred layout, inferred on a grid
        no finer than :attr:`matrix` (:func:`on_coarser_grid`; None: on the image's own grid)."""
        if self.matrix is not None and max(x0.shape[-2:]) > self.matrix:
            return on_coarser_grid(self._infer, x0, self.matrix)
        return self._infer(x0)

    def _infer(self, x0: torch.Tensor) -> torch.Tensor:
        channels = torch.view_as_real(x0).permute(0, 3, 1, 2)
        return torch.sigmoid(self.unet(channels.contiguous())[:, 0])


def on_coarser_grid(infer, x0: torch.Tensor, matrix: int) -> torch.Tensor:
    """``infer`` (a map from complex images to ``(B, ny, nx)`` weights) applied to ``x0`` ``(B, ny, nx)`` (centred)
    as if it had been acquired with at most ``matrix`` samples along its longer side: the central
    (ny·s) × (nx·s) of its k-space, s = matrix / max(ny, nx), transformed back (the same field of view in larger
    pixels; orthonormal FFTs keep the noise at 1 per pixel, as in a scan of that matrix), the weights bilinearly
    interpolated back to ny × nx. The U-Net then sees the anatomy at the scale it was trained at, whatever the
    matrix."""
    ny, nx = x0.shape[-2:]
    scale = matrix / max(ny, nx)
    cy, cx = (max(2, 2 * round(n * scale / 2)) for n in (ny, nx))
    sy, sx = ny // 2 - cy // 2, nx // 2 - cx // 2
    small = _fft.ifft2c(_fft.fft2c(x0)[..., sy:sy + cy, sx:sx + cx])
    weight = infer(small)
    return F.interpolate(weight.unsqueeze(1), size=(ny, nx), mode="bilinear", align_corners=False).squeeze(1)


def local_curvature(weight: torch.Tensor, image_gain: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The penalty form's curvature per code pixel, ``(B, 1, ny, nx)`` (native layout, as ``weight`` b):
    1 + γ_R b̄(p), b̄(p) the largest b within the filters' reach of p; FISTA's step is τ(p) = 1 / (‖D‖² (1 + γ_R b̄(p))).

    The smooth part's Hessian in the codes is Dᴴ(AᴴA + γ_R diag b)D. With ‖A‖ ≤ 1, DᴴAᴴAD ≤ ‖D‖² I. Writing
    b = ∫₀¹ 1[b > t] dt, each Dᴴ diag(1[b > t]) D touches only the codes whose filters reach {b > t}, so it is at
    most ‖D‖² diag(1[b̄ > t]); integrating, Dᴴ diag(b) D ≤ ‖D‖² diag(b̄). So diag(1/τ) majorises the Hessian and
    FISTA with this diagonal metric converges to the same minimiser as with the uniform step 1/((1 + γ_R)‖D‖²),
    while codes away from the background (b̄ ≈ 0, the anatomy) move (1 + γ_R) times as far per iteration."""
    reach = kernel_size // 2  # the filters are centred (recon.dictionary): a code reaches ± k_f // 2 pixels
    padded = F.pad(weight.unsqueeze(1), (reach,) * 4, mode="circular")
    return 1 + image_gain * F.max_pool2d(padded, 2 * reach + 1, stride=1)


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window`` × ``window`` box around every pixel of ``(B, ny, nx)``, wrapping around the edges."""
    pad = window // 2
    return F.avg_pool2d(F.pad(x.unsqueeze(1), (pad, pad, pad, pad), mode="circular"), window, stride=1).squeeze(1)


def disagreement_map(op, residual: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """Z per pixel ``(B, ny, nx)``: the image-domain residual averaged over a ``window`` × ``window`` box, in units
    of its noise-only standard deviation (0 outside the coil maps' support); see :func:`data_disagreement`."""
    residual = op.adjoint(residual)
    mask = op.mask.reshape(-1, *op.mask.shape[-2:]).to(residual.real.dtype)
    sampled = mask.mean(dim=(-2, -1)).view(-1, 1, 1)
    maps = getattr(op, "coil_maps", None)
    energy = maps.abs().pow(2).sum(dim=-3) if maps is not None else torch.ones_like(residual.real)
    variance = sampled * energy / window ** 2
    mean = torch.complex(_box_mean(residual.real, window), _box_mean(residual.imag, window))
    z = mean.abs() / variance.clamp_min(torch.finfo(variance.dtype).tiny).sqrt()
    return torch.where(variance > 0, z, torch.zeros_like(z))


def data_disagreement(op, residual: torch.Tensor, weight: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """How strongly the data contradict the image where the background weight acts: ``(B,)``.

    In noise units the image-domain residual r = Aᴴ(y − A x*) of a faithful image is Aᴴn, complex Gaussian with
    variance v = ρ Σ_c |c|² per pixel (ρ the sampled fraction of k-space; Σ|c|² = 1 for one coil), so its mean over a
    ``window`` × ``window`` box has variance about v / window² (the folding of line masks correlates pixels a field
    of view / R apart, not neighbours). Tissue that the weight removed leaves a residual of its own sign there, which
    the box average keeps while it averages the noise down. The measure is
    Z = max |box(r)| / √(v / window²) over the pixels with b > ½ and v > 0; 0 where b is nowhere above ½.
    For pure noise P(|box(r)| > t √(v / window²)) = exp(−t²) per pixel. ``residual`` is the k-space y − A x*,
    ``op`` and ``weight`` ``(B, ny, nx)`` in its layout (either: the box wraps around, as the FFT does)."""
    return largest_where_weighted(disagreement_map(op, residual, window), weight)


def largest_where_weighted(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The check from a :func:`disagreement_map` ``z``: its largest value where ``weight`` > ½, ``(B,)``."""
    return torch.where(weight > 0.5, z, torch.zeros_like(z)).amax(dim=(-2, -1))


def _grown(region: torch.Tensor, margin: int) -> torch.Tensor:
    """``region`` ``(B, ny, nx)`` bool grown by ``margin`` pixels (a square; wrapping around, as the FFT does)."""
    padded = F.pad(region.to(torch.float32).unsqueeze(1), (margin,) * 4, mode="circular")
    return F.max_pool2d(padded, 2 * margin + 1, stride=1).squeeze(1) > 0


def withdrawal(core: torch.Tensor, margin: int = DISAGREE_MARGIN, feather: int = FEATHER) -> torch.Tensor:
    """How much of the weight is withdrawn at each pixel, ``(B, ny, nx)`` in [0, 1], around the boxes ``core``
    (bool) where the data disagree: 1 within ``margin`` pixels of them (Chebyshev distance d ≤ margin), then falling
    linearly to 0 over the next ``feather`` pixels (1 − (d − margin)/feather, corners rounded by the box average),
    0 beyond. A hard edge would leave a rectangle of the weight-free image's noise beside exact zeros, visible at a
    background window; the fade withdraws more than the margin alone, never less."""
    if feather < 1 or feather % 2 == 0:
        raise ValueError(f"feather must be an odd number of pixels, got {feather}")
    half = feather // 2  # a box of feather pixels over the region grown half as far again
    return _box_mean(_grown(core, margin + half).to(torch.float32), feather)


def kept_where_data_agree(op, y: torch.Tensor, plain: torch.Tensor, weight: torch.Tensor, disagreement: torch.Tensor,
                          limit: float = WITHDRAW_Z, feather: int | None = None) -> SimpleNamespace:
    """The weight-free image of slices whose weighted image the data contradicted, given back the weight's factor
    where the data agree.

    b′ = b ⊙ (1 − w), w the :func:`withdrawal` around every box whose Z (``disagreement``, the map
    :func:`disagreement_map` of the weighted image) exceeds :data:`DISAGREE_Z`: b′ = 0 within
    :data:`DISAGREE_MARGIN` pixels of those boxes, back to b over the next ``feather`` (None: :data:`FEATHER`;
    1: a hard edge). The image is ``plain`` ⊙ (1 − b′) and is checked as every image is, where b′ > ½. Where it
    still exceeds ``limit`` the boxes of its own map join, up to :data:`DISAGREE_ROUNDS` times; a slice that never
    passes gets ``plain`` (b′ = 0).
    Each step only lowers the factor's reach, and the data decide every pixel it keeps. ``op``, ``y``, ``plain``
    (already 0 outside the maps' support), ``weight`` b and ``disagreement`` in the native layout, ``(B, …)``.

    Returns ``image``, ``weight`` b′, ``check`` (the final image's Z where b′ > ½), ``kept`` (B,): the share of
    b > ½ where b′ > ½ still (0 where the weight was withdrawn everywhere), and the k-space ``residual`` y − A·image."""
    feather = FEATHER if feather is None else feather
    disagree = disagreement > DISAGREE_Z
    for round_ in range(DISAGREE_ROUNDS + 1):
        kept_weight = weight * (1 - withdrawal(disagree, DISAGREE_MARGIN, feather).to(weight.dtype))
        image = plain * (1 - kept_weight)
        residual = y - op.forward(image)
        z = disagreement_map(op, residual)
        check = largest_where_weighted(z, kept_weight)
        passed = check <= limit
        if bool(passed.all()) or round_ == DISAGREE_ROUNDS:
            break
        disagree = disagree | ((z > DISAGREE_Z) & ~passed.view(-1, 1, 1))
    if not bool(passed.all()):  # those slices fall back to the weight-free image
        failed = ~passed.view(-1, *(1,) * (y.ndim - 1))
        kept_weight = torch.where(failed.view(-1, 1, 1), torch.zeros_like(kept_weight), kept_weight)
        image = torch.where(failed.view(-1, 1, 1), plain, image)
        residual = torch.where(failed, y - op.forward(plain), residual)
        check = torch.where(passed, check, torch.zeros_like(check))
    kept = (kept_weight > 0.5).sum(dim=(-2, -1)) / (weight > 0.5).sum(dim=(-2, -1)).clamp_min(1)
    return SimpleNamespace(image=image, weight=kept_weight, check=check, kept=kept.to(weight.dtype),
                           residual=residual)
