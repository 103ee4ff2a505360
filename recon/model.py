"""CDL-Λ: (PH) low-pass split → NET_Θ infers Λ → a convex solver on the weighted convolutional synthesis problem (PR).

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

On an image larger than the matrix m the Λ network was trained at (the same field of view in smaller pixels) the
dictionary is used at the network's scale: its filters resampled by n / m and β by (n / m)²
(:meth:`CDLLambda.dictionary_scale_for`); the output says which scale it used.

A network that infers a background weight b (:mod:`recon.background`) adds (γ_L/2)‖√b ⊙ x‖² to (PH) and
(γ_R/2)‖√b ⊙ (x_L + D s)‖² to (PR): the image is pulled to zero where b says the object is absent (FISTA only),
and the image is (1 − b) ⊙ (x_L + D s*): what the quadratic terms leave of noise there is taken out too.
Outside training every image is checked against its data (:func:`recon.background.data_disagreement`); above
``withdraw_z`` the slice is solved again without the weight, the factor 1 − b given back where the data agree
(:func:`recon.background.kept_where_data_agree`), and the output says which slices were and how much of the weight
each kept.

Solvers (``solver``): ADMM (:mod:`recon.admm`: x = D s and u = s split off, the codes solved exactly per
frequency, the image by warm-started CG) or FISTA (:mod:`recon.solvers`). One FISTA gradient costs 2K FFTs
(codes ↔ Fourier) plus 2C + 2 for a C-coil operator (none for a single coil, where A D s = S Σ_k d̂_k ŝ_k directly
in k-space); step τ = c / L with L = max_ω Σ_k |d̂_k(ω)|² ≥ ‖A D‖². Both stop each slice by a tolerance
(:mod:`recon.stopping`) under the ``iterations`` cap and report the iterations used and the final relative change.
Inputs and outputs use the centred layout; internally everything runs in the native FFT layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn

from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.lambda_nets import LambdaNet
from cdl_lambda.recon.lowpass import LowPassSplit
from cdl_lambda.recon.noise import noise_level
from cdl_lambda.recon.operators import make_operator
from cdl_lambda.recon.admm import ADMM, Problem
from cdl_lambda.recon.background import (WITHDRAW_Z, disagreement_map, kept_where_data_agree,
                                         largest_where_weighted, local_curvature)
from cdl_lambda.recon.solvers import fista
from cdl_lambda.recon.stopping import SolveInfo


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
    iterations_used: torch.Tensor | None = None       # (B,) solver iterations each slice took (≤ the cap)
    final_relative_change: torch.Tensor | None = None  # (B,) the stopping measure at the last iteration
    background: torch.Tensor | None = None             # (B, ny, nx) the background weight b in (0, 1), if inferred
    background_disagreement: torch.Tensor | None = None  # (B,) how strongly the data contradict it (recon.background)
    background_withdrawn: torch.Tensor | None = None     # (B,) bool: reconstructed without it, the data disagreeing
    background_kept: torch.Tensor | None = None          # (B,) share of b > ½ whose factor the image keeps (1: all)
    background_applied: torch.Tensor | None = None       # (B, ny, nx) the weight whose factor 1 − b the image carries
    dictionary_scale: float = 1.0  # the grid the dictionary's filters were resampled onto (CDLLambda.dictionary_scale)


DEFAULT_SCALAR_LAMBDA = 1.0  # noise units; with β = DEFAULT_SCALAR_BETA the best pair on the validation split
DEFAULT_SCALAR_BETA = 3.0
NETWORK_INPUT_SCALE = 0.25   # the network sees x₀ / (4σ): inputs of a few units at SNR 5–50


SOLVERS = ("admm", "fista")
# checked at construction and again at the solve (a caller may switch ``solver`` afterwards)
ADMM_REFUSES_BACKGROUND = "the ADMM solver does not take the background weight of this network: use FISTA"


class CDLLambda(nn.Module):
    """The CDL-Λ reconstruction. ``lambda_net=None`` gives the classical baseline with one scalar λ for all
    filters and pixels (``scalar_lambda``, in noise units). ``cg_iterations``: conjugate-gradient steps of the
    multi-coil low-pass part.

    Solver: ``"admm"`` (:mod:`recon.admm`, the structure-aware splitting) or ``"fista"`` (:mod:`recon.solvers`);
    ``iterations`` is the cap and ``tolerance`` the stopping rule (0: always run the cap): FISTA stops an item when
    the relative change of its codes ‖s⁺ − s‖/‖s⁺‖ is at most ``tolerance``, ADMM when its relative primal residual
    and change are. ``compiled`` fuses FISTA's element-wise work with ``torch.compile`` where no gradient is
    built. ``lambda_passes`` P > 1 (FISTA only): the cap is split into P passes, and before each pass after the first
    Λ is inferred again by the same network from the image so far, x_L + D s (less aliased than x₀), the codes
    carried on; each pass differentiates its last ``grad_iterations`` steps. The output's Λ is the first pass's."""

    def __init__(self, lambda_net: LambdaNet | None = None, beta: float = 1.0, iterations: int = 64,
                 grad_iterations: int = 8, step_factor: float = 0.99, inertia: float = 3.0,
                 scalar_lambda: float = DEFAULT_SCALAR_LAMBDA, cg_iterations: int = 12, compiled: bool = False,
                 solver: str = "fista", tolerance: float = 0.0, admm: ADMM | None = None,
                 withdraw_z: float = WITHDRAW_Z, dictionary_scale: float | str = "auto", lambda_passes: int = 1):
        super().__init__()
        if not (isinstance(lambda_passes, int) and lambda_passes >= 1):
            raise ValueError(f"lambda_passes must be a positive integer, got {lambda_passes!r}")
        if lambda_passes > 1 and solver != "fista":
            raise ValueError("lambda_passes > 1 continues FISTA's codes from pass to pass: use the FISTA solver")
        if dictionary_scale != "auto" and not (isinstance(dictionary_scale, (int, float)) and dictionary_scale > 0):
            raise ValueError(f"dictionary_scale must be 'auto' or a positive number, got {dictionary_scale!r}")
        if not 0 < step_factor < 1:
            raise ValueError(f"step_factor must be in (0, 1), got {step_factor}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}: one of {', '.join(SOLVERS)}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be ≥ 0, got {tolerance}")
        self.lambda_net = lambda_net
        self.split = LowPassSplit(beta)
        self.iterations = iterations
        self.grad_iterations = grad_iterations
        self.step_factor = step_factor
        self.inertia = inertia
        self.scalar_lambda = scalar_lambda
        self.cg_iterations = cg_iterations
        self.compiled = compiled
        self.solver = solver
        self.tolerance = tolerance
        self.admm = admm or ADMM()
        self.withdraw_z = withdraw_z
        self.dictionary_scale = dictionary_scale
        self.lambda_passes = lambda_passes
        if solver == "admm" and self._background_net() is not None:
            raise ValueError(ADMM_REFUSES_BACKGROUND)

    @classmethod
    def deployed(cls, loaded, iterations: int | None = None, compiled: bool = False,
                 dictionary_scale: float | str = "auto") -> "CDLLambda":
        """The model a shipped network runs as: its Λ network and β with the solver, cap, stopping rule and Λ passes
        of its manifest entry (``loaded``: a :class:`recon.weights.LoadedNetwork`); ``iterations`` overrides the
        cap."""
        solver = loaded.solver_settings()
        return cls(loaded.network, beta=loaded.beta, iterations=int(iterations or solver["iterations"]),
                   compiled=compiled, solver=solver["solver"], tolerance=float(solver["tolerance"]),
                   dictionary_scale=dictionary_scale, lambda_passes=int(solver.get("lambda_passes", 1)))

    def dictionary_scale_for(self, shape: tuple[int, int]) -> float:
        """How much finer a grid the dictionary's filters are resampled onto for an image of ``shape``
        (:meth:`recon.dictionary.Dictionary.resampled`). ``"auto"``: n / m for an image whose longer side n exceeds
        the matrix m the Λ network was trained at (the same field of view in smaller pixels: the filters keep the
        extent in the anatomy the network learned Λ for, and the (PH) split's β follows as β · scale², its cut-off
        where the filters' band starts), else 1; a number: that scale (1: the filters and β as learned)."""
        if self.dictionary_scale != "auto":
            return float(self.dictionary_scale)
        matrix, n = getattr(self.lambda_net, "matrix", None), max(shape)
        return n / matrix if matrix and n > matrix else 1.0

    def _background_net(self):
        return getattr(self.lambda_net, "background", None)

    def background_terms(self, x0_centred: torch.Tensor) -> SimpleNamespace | None:
        """The background weight b ``(B, ny, nx)`` (centred and native layout) with its gains γ_L, γ_R, from the
        zero-filled image in noise units; None for a network without one."""
        net = self._background_net()
        if net is None:
            return None
        b = net(x0_centred * NETWORK_INPUT_SCALE).to(x0_centred.real.dtype)
        return SimpleNamespace(centred=b, native=_fft.to_native(b), lowpass_gain=net.lowpass_gain,
                               image_gain=net.image_gain, form=net.form, step=net.step)

    def background_weight(self, kspace: torch.Tensor, mask: torch.Tensor, coil_maps: torch.Tensor | None = None,
                          noise_std: torch.Tensor | float | None = None) -> torch.Tensor:
        """b ``(B, ny, nx)`` (centred) of a scan, the input as for :meth:`forward`; only for a network with one."""
        if self._background_net() is None:
            raise ValueError("this network infers no background weight")
        scan = self._scan_in_noise_units(kspace, mask, coil_maps, noise_std)
        return self.background_terms(_fft.from_native(scan.op.adjoint(scan.y))).centred

    def lambda_maps(self, x0_centred: torch.Tensor, dictionary: Dictionary) -> torch.Tensor:
        """Λ ``(B, K, ny, nx)`` in noise units from the zero-filled image in noise units (centred layout)."""
        if self.lambda_net is None:
            b, (ny, nx) = x0_centred.shape[0], x0_centred.shape[-2:]
            return torch.full((b, dictionary.num_filters, ny, nx), float(self.scalar_lambda),
                              device=x0_centred.device)
        return self.lambda_net(x0_centred * NETWORK_INPUT_SCALE, dictionary)

    def forward(self, kspace: torch.Tensor, mask: torch.Tensor, dictionary: Dictionary,
                coil_maps: torch.Tensor | None = None, noise_std: torch.Tensor | float | None = None,
                iterations: int | None = None, grad_iterations: int | None = None,
                with_background: bool = True) -> ReconOutput:
        """kspace: complex centred ``(B, ny, nx)`` (single coil) or ``(B, C, ny, nx)`` with ``coil_maps`` of the
        same shape; mask ``(ny, nx)`` or ``(B, ny, nx)``; noise_std: σ per batch item (None: estimated).
        ``with_background=False`` solves without the network's background weight, as a withdrawn slice is solved
        (training uses it to keep that image good)."""
        iterations = self.iterations if iterations is None else iterations
        grad_iterations = self.grad_iterations if grad_iterations is None else grad_iterations
        dictionary = dictionary.resampled(self.dictionary_scale_for(tuple(kspace.shape[-2:])))  # at the net's scale
        scan = self._scan_in_noise_units(kspace, mask, coil_maps, noise_std)      # checks, σ, native layout
        x0 = scan.op.adjoint(scan.y)
        x0_centred = _fft.from_native(x0)
        background = self.background_terms(x0_centred) if with_background else None  # b = NET_Θ(x₀), or None
        lam = self.lambda_maps(x0_centred, dictionary).to(x0.real.dtype)           # Λ = NET_Θ(x₀, D)
        lam_native = _fft.to_native(lam)
        image, x_low, info = self._reconstruct(scan, x0, lam_native, dictionary,   # (PH), (PR)
                                               iterations, grad_iterations, background)
        if background is None:
            return self._output(scan, image, x0, x_low, lam, info, scale=dictionary.scale)
        disagreement = withdrawn = residual = kept = applied = None
        if not self.training:  # the weight checked against the data; withdrawn where they disagree
            with torch.no_grad():
                residual = scan.y - scan.op.forward(image)                         # y − A x*, kept for _output
                disagreement_z = disagreement_map(scan.op, residual)               # Z per pixel
                disagreement = largest_where_weighted(disagreement_z, background.native)
            withdrawn = disagreement > self.withdraw_z
            kept = torch.where(withdrawn, 0.0, 1.0).to(disagreement.dtype)
            applied = background.native
            if bool(withdrawn.any()):  # only those slices solved again, without the weight
                rows = withdrawn.nonzero().flatten()
                again = self._scan_in_noise_units(kspace[rows], mask[rows] if mask.ndim == 3 else mask,
                                                  None if coil_maps is None else coil_maps[rows], scan.sigma[rows])
                plain, plain_low, plain_info = self._reconstruct(again, x0[rows], lam_native[rows], dictionary,
                                                                 iterations, grad_iterations, None)
                with torch.no_grad():  # the weight's factor given back where the data agree
                    part = kept_where_data_agree(again.op, again.y, plain, background.native[rows],
                                                 disagreement_z[rows], self.withdraw_z)
                    kept = kept.index_copy(0, rows, part.kept)
                    applied = applied.index_copy(0, rows, part.weight)
                    residual = residual.index_copy(0, rows, part.residual)         # their images changed
                image, x_low, info = _replace_rows(rows, (part.image, plain_low, plain_info), (image, x_low, info))
        output = self._output(scan, image, x0, x_low, lam, info, residual, dictionary.scale)
        output.background = background.centred
        output.background_disagreement, output.background_withdrawn = disagreement, withdrawn
        output.background_kept = kept
        output.background_applied = None if kept is None else _fft.from_native(applied)
        return output

    # ---- the steps of forward ------------------------------------------------------------------------------
    def _reconstruct(self, scan, x0, lam, dictionary, iterations, grad_iterations, background):
        """(PH) and (PR) with or without the background weight: x* = x_L + D s* (times 1 − b with the weight),
        x_L and the solver's info, set to 0 outside the coil maps' support."""
        x_low = self._low_pass(scan, x0, background, dictionary.scale)                        # (PH)
        codes, used = None, 0
        for n, steps in enumerate(_pass_lengths(iterations, self.lambda_passes)):              # (PR)
            if n:  # Λ again from the image so far
                lam = _fft.to_native(self.lambda_maps(_fft.from_native(self._image(scan, x_low, codes, dictionary,
                                                                                   background)), dictionary))
            codes, info = self._solve(scan, x_low, lam.to(x_low.real.dtype), dictionary, steps, grad_iterations,
                                      background, codes)
            used = info.iterations + used
        info = SolveInfo(used, info.relative_change)
        image = self._image(scan, x_low, codes, dictionary, background)
        return image, (x_low if scan.support is None else x_low * scan.support), info

    @staticmethod
    def _image(scan, x_low, codes, dictionary, background):
        """x* = x_L + D s (times 1 − b with the weight: the background's remaining noise out; the data check judges
        this image), 0 outside the coil maps' support."""
        image = x_low + _fft.ifft2(dictionary.synthesize_fourier(_fft.fft2(codes)))
        if background is not None:
            image = image * (1 - background.native)
        return image if scan.support is None else image * scan.support

    @staticmethod
    def _scan_in_noise_units(kspace, mask, coil_maps, noise_std) -> SimpleNamespace:
        """Check the input, find σ, and return the scan in noise units and native layout: ``y``, the operator
        ``op``, ``sigma`` (B,), ``maps`` and the maps' ``support`` (None for a single coil)."""
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
            noise_std = noise_level(kspace if multi else kspace.unsqueeze(1), sample_mask)[0]
        sigma = torch.as_tensor(noise_std, dtype=kspace.real.dtype, device=kspace.device).reshape(-1)
        sigma = sigma.expand(batch).clamp_min(torch.finfo(sigma.dtype).tiny)
        maps = _fft.to_native(coil_maps.to(kspace.dtype)) if multi else None
        op = make_operator(_fft.to_native(mask), maps, centred=False)
        y = _fft.to_native(kspace) / sigma.view(-1, *(1,) * (kspace.ndim - 1))
        support = (maps.abs().pow(2).sum(dim=-3) > 0).to(y.real.dtype) if multi else None
        return SimpleNamespace(y=y, op=op, sigma=sigma, multi=multi, support=support)

    def _low_pass(self, scan, x0: torch.Tensor, background=None, scale: float = 1.0) -> torch.Tensor:
        """x_L: the paper's filter for one coil, the data-consistent CG solve for several or with a background
        weight (γ_L b on the diagonal); β at the dictionary's ``scale`` (:class:`recon.lowpass.LowPassSplit`)."""
        if background is not None:
            weight = background.lowpass_gain * background.native
            return self.split.data_consistent(scan.op, x0, self.cg_iterations, weight, scale)
        if scan.multi:
            return self.split.data_consistent(scan.op, x0, self.cg_iterations, scale=scale)
        return self.split(x0, scale)

    def _solve(self, scan, x_low, lam, dictionary: Dictionary, iterations: int,
               grad_iterations: int, background=None, initial=None) -> tuple[torch.Tensor, SolveInfo]:
        """s* of (PR) for y′ = y − A x_L with the chosen solver, its cap and stopping rule (FISTA from the codes
        ``initial``, None: zero)."""
        shape = tuple(x_low.shape[-2:])
        d_hat = dictionary.spectra(shape, x_low.device, x_low.dtype)
        if self.solver == "admm":
            if background is not None:
                raise ValueError(ADMM_REFUSES_BACKGROUND)
            residual_data = scan.y - scan.op.forward(x_low)
            problem = Problem(d_hat, lam, scan.op.adjoint(residual_data),
                              normal=scan.op.normal if scan.multi else None,
                              mask=None if scan.multi else scan.op.mask, y_hat=None if scan.multi else residual_data)
            return self.admm(problem, iterations, self.tolerance, grad_iterations)
        b_hat, normal_fourier, curvature = _smooth_term(scan, x_low, background, dictionary.kernel_size)
        return self._fista(b_hat, normal_fourier, curvature, lam, dictionary, d_hat, iterations, grad_iterations,
                           initial)

    def _fista(self, b_hat, normal_fourier, curvature, lam, dictionary, d_hat, iterations, grad_iterations,
               initial=None):
        """FISTA on ½⟨D s, N D s⟩ − Re⟨D s, F⁻¹b̂⟩ + ‖Λ ⊙ s‖₁ (N and b̂ from :func:`_smooth_term`) with the step
        τ = c / (curvature · ‖D‖²) (≥ 1/‖N^½ D‖² since ‖A‖ ≤ 1), fused in the Fourier domain. ``curvature`` a
        number, or a map ``(B, 1, ny, nx)`` per code pixel (:func:`recon.background.local_curvature`): then the step
        is taken in the image domain."""
        shape = tuple(d_hat.shape[-2:])
        step = self.step_factor / (curvature * dictionary.lipschitz(shape))
        def residual(z_hat: torch.Tensor) -> torch.Tensor:
            """F N D z − b̂ ``(B, ny, nx)``: the gradient before Dᴴ."""
            return (normal_fourier(dictionary.synthesize_fourier(z_hat)) - b_hat).unsqueeze(1)

        if isinstance(step, torch.Tensor):
            conj = d_hat.conj()

            def forward_step(z: torch.Tensor) -> torch.Tensor:
                """z − τ ⊙ Dᴴ (N D z − F⁻¹b̂), τ per code pixel: the step in the image domain."""
                return z - step * _fft.ifft2(residual(_fft.fft2(z)) * conj)
        else:
            step_conj = step * d_hat.conj()

            def forward_step(z: torch.Tensor) -> torch.Tensor:
                """z − τ Dᴴ (N D z − F⁻¹b̂), computed as F⁻¹(ẑ − τ d̂ᴴ (F N D z − b̂)) in the Fourier domain."""
                z_hat = _fft.fft2(z)
                return _fft.ifft2(torch.addcmul(z_hat, residual(z_hat), step_conj, value=-1))

        codes0 = torch.zeros(b_hat.shape[0], dictionary.num_filters, *shape, dtype=d_hat.dtype, device=d_hat.device) \
            if initial is None else initial
        return fista(forward_step, step * lam, codes0, iterations, grad_iterations, self.inertia,
                     compiled=self.compiled, tolerance=self.tolerance, with_info=True)

    @staticmethod
    def _output(scan, image, x0, x_low, lam, info: SolveInfo, residual=None, scale: float = 1.0) -> ReconOutput:
        """Back to the centred layout and the input's units, with the data residual relative to the noise
        (``residual`` y − A x* when the caller has it) and the dictionary's ``scale``."""
        y = scan.y
        with torch.no_grad():
            residual = y - scan.op.forward(image) if residual is None else residual
            measured = scan.op.mask.expand(y.shape).sum(dim=tuple(range(1, y.ndim))).clamp_min(1)
            ratio = (residual.abs().pow(2).sum(dim=tuple(range(1, y.ndim))) / measured).sqrt()
        rescale = scan.sigma[:, None, None]
        return ReconOutput(image=_fft.from_native(image) * rescale, zero_filled=_fft.from_native(x0) * rescale,
                           low_pass=_fft.from_native(x_low) * rescale, lambda_maps=lam, noise_std=scan.sigma,
                           residual_to_noise=ratio, iterations_used=info.iterations,
                           final_relative_change=info.relative_change, dictionary_scale=scale)


def _pass_lengths(iterations: int, passes: int) -> list[int]:
    """The cap split into ``passes`` passes as evenly as it goes, the longer ones last (32 in 2: 16, 16)."""
    base, extra = divmod(iterations, passes)
    return [base + (n >= passes - extra) for n in range(passes)]


def _replace_rows(rows: torch.Tensor, replacement: tuple, current: tuple) -> tuple:
    """(image, x_L, SolveInfo) of the batch ``current`` with its items ``rows`` taken from ``replacement`` (the
    solve of those items alone)."""
    (image, x_low, info), (image0, x_low0, info0) = replacement, current
    on = lambda t: rows.to(t.device)  # noqa: E731 - SolveInfo's counts live on the CPU
    merged = SolveInfo(info0.iterations.index_copy(0, on(info0.iterations), info.iterations),
                       info0.relative_change.index_copy(0, on(info0.relative_change), info.relative_change))
    return image0.index_copy(0, rows, image), x_low0.index_copy(0, rows, x_low), merged


def _factored_normal_fourier(op, keep: torch.Tensor):
    """u ↦ F K AᴴA K F⁻¹ u with K = diag(1 − b) (``keep``, the operator's layout): the normal operator of A K, for
    one coil or several (K sits between the Fourier transforms either way)."""
    return lambda u: _fft.fft2(keep * op.normal(keep * _fft.ifft2(u)))


def _smooth_term(scan, x_low: torch.Tensor, background=None, kernel_size: int = 1):
    """The smooth part of (PR) in the Fourier domain, the one place the background weight's form and step are read:
    (b̂, N, curvature) with the gradient Dᴴ(N D s − F⁻¹b̂) and Dᴴ N D ≤ ‖D‖² · curvature (a number, or per code pixel
    for the local step: :func:`recon.background.local_curvature`, ``kernel_size`` the filters').

    Without a weight N = AᴴA and b̂ = F(Aᴴy′), y′ = y − A x_L. In the penalty form the smooth part gains
    (γ_R/2)‖√b ⊙ (x_L + D s)‖²: N = AᴴA + γ_R b, b̂ = F(Aᴴy′ − γ_R b ⊙ x_L), curvature 1 + γ_R. In the factor form
    A becomes A K, K = diag(1 − b): N = K AᴴA K, b̂ = F(K Aᴴ(y − A K x_L)), curvature 1."""
    op = scan.op
    if background is not None and background.form == "factor":
        keep = 1 - background.native
        residual_data = scan.y - op.forward(keep * x_low)
        return _fft.fft2(keep * op.adjoint(residual_data)), _factored_normal_fourier(op, keep), 1.0
    residual_data = scan.y - op.forward(x_low)
    b_hat = _fft.fft2(op.adjoint(residual_data)) if scan.multi else residual_data  # one coil: F Aᴴ = the mask
    if background is None:
        return b_hat, op.normal_fourier, 1.0
    image_weight = background.image_gain * background.native
    curvature = (local_curvature(background.native, background.image_gain, kernel_size)
                 if background.step == "local" else 1 + background.image_gain)
    return (b_hat - _fft.fft2(image_weight * x_low), _weighted_normal_fourier(op, image_weight, scan.multi),
            curvature)


def _weighted_normal_fourier(op, weight: torch.Tensor, multi: bool):
    """u ↦ F (AᴴA + diag(w)) F⁻¹ u, w the background term in the operator's layout. Several coils: one inverse and
    one forward FFT around both terms (AᴴA works on the image anyway); one coil: AᴴA is the mask in Fourier, and
    only the diagonal term needs the image."""
    if multi:
        def apply(u: torch.Tensor) -> torch.Tensor:
            x = _fft.ifft2(u)
            return _fft.fft2(op.normal(x) + weight * x)
    else:
        def apply(u: torch.Tensor) -> torch.Tensor:
            return op.normal_fourier(u) + _fft.fft2(weight * _fft.ifft2(u))
    return apply
