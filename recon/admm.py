"""ADMM for the weighted convolutional synthesis problem (PR), built for its structure.

    min_s ½‖A D s − y′‖² + Σ_k ‖Λ_k ⊙ Re s_k‖₁ + ‖Λ_k ⊙ Im s_k‖₁

Per frequency ω the dictionary is one row d̂(ω) ∈ ℂ^K, so DᴴD = conj(d̂) d̂ᵀ has rank one: plain proximal
gradient (FISTA) crawls along its null space. Splitting x = D s (image) and u = s (codes) gives

    min ½‖A x − y′‖² + ‖Λ ⊙ u‖₁   subject to   D s = x,  s = u,

a two-block ADMM (block 1: s; block 2: (x, u), separable), scaled duals η_x, η_u, penalties ρ (for x = D s) and
ρ_u (for u = s), over-relaxation α ∈ (0, 2) (Eckstein & Bertsekas 1992):

    s  ← argmin ρ/2 ‖D s − x + η_x‖² + ρ_u/2 ‖s − u + η_u‖²
         = per ω:  (ρ conj(d̂) d̂ᵀ + ρ_u I) ŝ = r̂,  r̂ = ρ conj(d̂) F(x − η_x) + ρ_u F(u − η_u),
           by Sherman–Morrison  ŝ = (r̂ − ρ conj(d̂) (d̂ᵀ r̂) / (ρ_u + ρ ‖d̂‖²)) / ρ_u        (exact, 2K FFTs)
    h_x = α D s + (1 − α) x,   h_u = α s + (1 − α) u                                       (relaxation)
    x  ← argmin ½‖A x − y′‖² + ρ/2 ‖x − h_x − η_x‖²  ⇔  (AᴴA + ρI) x = Aᴴy′ + ρ (h_x + η_x)
         single coil: exact in Fourier, x̂ = (S ŷ′ + ρ F(h_x + η_x)) / (S + ρ);
         several coils: conjugate gradients warm-started at the previous x (below)
    u  ← soft(h_u + η_u, Λ / ρ_u)                                                        (on Re and Im)
    η_x ← η_x + h_x − x,   η_u ← η_u + h_u − u.

Convergence: for this convex problem the two-block ADMM with exact block updates and α ∈ (0, 2) converges to a
minimiser for any ρ, ρ_u > 0 (Eckstein & Bertsekas 1992), from any start. The only inexact update is the multi-coil
x-step. (AᴴA + ρI) has condition number at most (1 + ρ)/ρ (‖A‖ ≤ 1), so CG contracts its error by at least
(√κ − 1)/(√κ + 1) per step (0.27 at ρ = 0.5); it runs until the residual is below ε_n ‖rhs‖ with
ε_n = ``cg_tolerance`` / n^1.1 (summable, which is what inexact ADMM needs to keep its guarantee; Eckstein &
Bertsekas, Theorem 8), at most ``cg_max`` steps (reached only if that tolerance is set unreasonably tight).

Cost per iteration: 2K + 2 FFTs (codes to and from Fourier, x − η_x in, D s out) plus 2C per CG step (m ≈ 1–3;
the CG's A-product of the last x is carried over, so a warm start costs none), against FISTA's 2K + 2C + 2.

Stopping rule: with the primal residual r = ‖(D s − x, s − u)‖ and the change of the (x, u) block
c = ‖(x − x⁻, u − u⁻)‖ (ρ-scaled, the dual residual), both relative to ‖(x, u)‖, item b stops at the first
iteration where max(r, c) ≤ ``tolerance``; ``iterations`` is the cap. Items are independent, so an item that has
stopped is frozen (its result copied out) while the others go on: the result of a slice does not depend on the
batch it came in. ``SolveInfo`` reports per item the iterations used and the final max(r, c).

Training: the steps up to the stop (or ``iterations − grad_iterations``) build no graph; then ``grad_iterations``
more are differentiated (truncated back-propagation). At inference (no grad) the tail is not run: near the stop the
tail moves the codes by about ``grad_iterations × tolerance`` relative, which the network sees in training.

The returned codes are u (exactly sparse), so x* = x_L + D u.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.stopping import SolveInfo, StoppingRule

ImageMap = Callable[[torch.Tensor], torch.Tensor]


def soft(v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Soft-thresholding of Re and Im of complex ``v`` by a real ``threshold`` broadcast to ``v``."""
    real = torch.view_as_real(v)
    t = threshold.unsqueeze(-1)
    return torch.view_as_complex(torch.relu(real - t) - torch.relu(-t - real))


def _norm2(x: torch.Tensor) -> torch.Tensor:
    """Squared ℓ2 norm of each batch item: ``(B, …)`` → ``(B,)``."""
    return torch.view_as_real(x).pow(2).flatten(1).sum(dim=1)


def cg_until(apply: ImageMap, rhs: torch.Tensor, x: torch.Tensor, tolerance: float, max_steps: int,
             applied: torch.Tensor | None = None, steps: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conjugate gradients for Hermitian positive definite ``apply`` from ``x`` until ‖r_b‖ ≤ tolerance ‖rhs_b‖ for
    each batch item b (an item that meets it stops moving while the others go on, so items stay independent), or
    ``max_steps``. Returns (x, apply(x)), the latter as rhs − r from the recursion, so that a warm-started next call
    passes it as ``applied`` and saves one application. Differentiable. ``steps``: a list the number of steps
    taken is appended to."""
    dims = tuple(range(1, rhs.ndim))
    r = rhs - (apply(x) if applied is None else applied)
    rr = r.abs().pow(2).sum(dim=dims, keepdim=True)
    goal = (tolerance ** 2) * rhs.abs().pow(2).sum(dim=dims, keepdim=True)
    p = r
    taken = 0
    while taken < max_steps:
        active = rr > goal
        if not bool(active.any()):
            break
        taken += 1
        ap = apply(p)
        alpha = active * rr / (p.conj() * ap).real.sum(dim=dims, keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = r.abs().pow(2).sum(dim=dims, keepdim=True)
        p = r + (rr_next / rr.clamp_min(1e-30)) * p
        rr = rr_next
    if steps is not None:
        steps.append(taken)
    return x, rhs - r


@dataclass
class Problem:
    """(PR) in the native FFT layout. ``d_hat``: filter spectra (K, ny, nx); ``threshold``: Λ (B, K, ny, nx);
    ``rhs``: Aᴴy′ (B, ny, nx). Multi coil: ``normal`` = AᴴA on images; single coil: ``mask`` S (native) and
    ``y_hat`` = S F Aᴴy′ … i.e. the measured residual k-space y′ (B, ny, nx), ``normal`` None."""

    d_hat: torch.Tensor
    threshold: torch.Tensor
    rhs: torch.Tensor
    normal: ImageMap | None = None
    mask: torch.Tensor | None = None
    y_hat: torch.Tensor | None = None


class _State:
    """The iterates: codes spectrum ŝ, image x, sparse codes u, scaled duals η_x, η_u, and (AᴴA + ρI) x from the
    last CG (``applied``; None where not known)."""

    __slots__ = ("s_hat", "x", "u", "eta_x", "eta_u", "applied")

    def __init__(self, s_hat, x, u, eta_x, eta_u, applied=None):
        self.s_hat, self.x, self.u, self.eta_x, self.eta_u, self.applied = s_hat, x, u, eta_x, eta_u, applied

    def detached(self) -> "_State":
        return _State(*(None if t is None else t.detach()
                        for t in (self.s_hat, self.x, self.u, self.eta_x, self.eta_u, self.applied)))


DEFAULT_RHO = 0.5
DEFAULT_RHO_CODES = 0.5
DEFAULT_RELAXATION = 1.6


class ADMM:
    """The solver (module docstring). ``rho``: penalty of x = D s; ``rho_codes``: of u = s; ``relaxation``: α."""

    def __init__(self, rho: float = DEFAULT_RHO, rho_codes: float = DEFAULT_RHO_CODES,
                 relaxation: float = DEFAULT_RELAXATION, cg_tolerance: float = 0.1, cg_max: int = 12):
        if rho <= 0 or rho_codes <= 0:
            raise ValueError(f"ADMM penalties must be positive, got ρ = {rho}, ρ_u = {rho_codes}")
        if not 0 < relaxation < 2:
            raise ValueError(f"over-relaxation must be in (0, 2), got {relaxation}")
        self.rho, self.rho_codes, self.relaxation = rho, rho_codes, relaxation
        self.cg_tolerance, self.cg_max = cg_tolerance, cg_max
        self.cg_steps: list[int] = []  # CG steps of each x-step of the last solve (for the cost accounting)

    # ---- one iteration ------------------------------------------------------------------------------------
    def _codes_step(self, p: Problem, st: _State) -> torch.Tensor:
        """ŝ by the per-frequency Sherman–Morrison solve of (ρ conj(d̂) d̂ᵀ + ρ_u I) ŝ = r̂."""
        rho, rho_u = self.rho, self.rho_codes
        a = p.d_hat.conj()
        r_hat = (rho * a) * _fft.fft2(st.x - st.eta_x).unsqueeze(1) + rho_u * _fft.fft2(st.u - st.eta_u)
        dr = (p.d_hat * r_hat).sum(dim=1, keepdim=True)
        return (r_hat - (rho / (rho_u + rho * self._d_energy)) * a * dr) / rho_u

    def _image_step(self, p: Problem, target: torch.Tensor, st: _State, n: int):
        """x = (AᴴA + ρI)⁻¹ (Aᴴy′ + ρ target); returns (x, (AᴴA + ρI) x or None)."""
        rho = self.rho
        if p.normal is None:  # single coil: diagonal in Fourier
            return _fft.ifft2((p.y_hat * p.mask + rho * _fft.fft2(target)) / (p.mask + rho)), None
        tolerance = self.cg_tolerance / n ** 1.1
        return cg_until(lambda v: p.normal(v) + rho * v, p.rhs + rho * target, st.x, tolerance, self.cg_max,
                        st.applied, self.cg_steps)

    def _step(self, p: Problem, st: _State, n: int, measure: bool = True):
        """One iteration; returns the new state and, with ``measure``, the squared relative primal residual and
        ρ-scaled change (else None, None: the norms cost four passes over the codes)."""
        alpha = self.relaxation
        s_hat = self._codes_step(p, st)
        ds = _fft.ifft2((s_hat * p.d_hat).sum(dim=1))
        s = _fft.ifft2(s_hat)
        h_x = alpha * ds + (1 - alpha) * st.x
        h_u = alpha * s + (1 - alpha) * st.u
        x, applied = self._image_step(p, h_x + st.eta_x, st, n)
        u = soft(h_u + st.eta_u, p.threshold / self.rho_codes)
        new = _State(s_hat, x, u, st.eta_x + h_x - x, st.eta_u + h_u - u, applied)
        if not measure:
            return new, None, None
        primal = _norm2(ds - x) + _norm2(s - u)
        change = self.rho * _norm2(x - st.x) + self.rho_codes * _norm2(u - st.u)
        scale = (_norm2(x) + _norm2(u)).clamp_min(torch.finfo(x.real.dtype).tiny)
        return new, primal / scale, change / (scale * min(self.rho, self.rho_codes))

    # ---- the solve -----------------------------------------------------------------------------------------
    def __call__(self, problem: Problem, iterations: int, tolerance: float = 0.0, grad_iterations: int = 0,
                 callback: Callable[[int, torch.Tensor], None] | None = None) -> tuple[torch.Tensor, SolveInfo]:
        """Codes u ``(B, K, ny, nx)`` and a :class:`SolveInfo`. ``tolerance`` 0 runs the full cap."""
        p = problem
        self._d_energy = p.d_hat.abs().pow(2).sum(dim=0)
        self.cg_steps = []
        batch = p.rhs.shape[0]
        zeros_codes = torch.zeros((batch, *p.d_hat.shape), dtype=p.rhs.dtype, device=p.rhs.device)
        zeros_image = torch.zeros_like(p.rhs)
        st = _State(zeros_codes, zeros_image, zeros_codes, zeros_image, zeros_codes, zeros_image)
        tail = min(grad_iterations, iterations) if torch.is_grad_enabled() else 0
        rule = StoppingRule(batch, iterations, tolerance, freeze=tail == 0)
        n = 0
        with torch.no_grad():
            while n < iterations - tail:
                n += 1
                measure = tolerance > 0 or n == iterations - tail
                st, primal, change = self._step(p, st, n, measure)
                if callback is not None:
                    callback(n, st.u)
                if measure and rule.update(n, torch.maximum(primal, change).sqrt(), st.u):
                    break
        if not tail:
            return rule.result(st.u), rule.info()
        st = st.detached()
        for k in range(tail):
            n += 1
            st, primal, change = self._step(p, st, n, measure=k == tail - 1)
        return st.u, rule.info(tail, n, torch.maximum(primal, change).sqrt())
