"""FISTA with convergent-iterates inertia (Chambolle & Dossal 2015) and truncated back-propagation.

Solves min_s f(s) + Σ ‖Λ ⊙ Re s‖₁ + ‖Λ ⊙ Im s‖₁ for complex codes s, given the forward (gradient) step
v = z − τ∇f(z):

    s^{n+1} = soft(z^n − τ ∇f(z^n), τ Λ)         (on real and imaginary parts)
    z^{n+1} = s^{n+1} + α_n (s^{n+1} − s^n),      α_n = (t_n − 1) / t_{n+1} = (n − 1) / (n + a),
    t_n = (n + a − 1) / a,  a > 2,  s⁰ = z⁰ = 0.

With a > 2 the iterates converge (not only the objective), which keeps the unrolled scheme a genuine convex solver
for fixed Λ. The first ``iterations − grad_iterations`` steps run without building an autograd graph; gradients flow
only through the last ``grad_iterations`` steps, so training memory grows with that number, not with ``iterations``.

The caller supplies the forward step rather than ∇f so that it can fuse the step into its own transforms (CDL-Λ
does it in the Fourier domain: z − τ∇f(z) = F⁻¹(ẑ − τ d̂ᴴ r̂), saving one pass over the codes).
"""

from __future__ import annotations

from typing import Callable

import torch

from cdl_lambda.recon import compiled as _compiled
from cdl_lambda.recon.compiled import compile_available, compile_cache_dir  # noqa: F401 - re-exported for existing callers
from cdl_lambda.recon.stopping import StoppingRule, relative_change

Step = Callable[[torch.Tensor], torch.Tensor]


def gradient_step(gradient: Step, step: float) -> Step:
    """The forward step z ↦ z − τ ∇f(z) from a gradient function."""
    return lambda z: z - step * gradient(z)


def _real_threshold(threshold: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A threshold laid out like ``view_as_real(codes)`` (…, 2), materialised once: broadcasting along the
    innermost axis inside the loop would be several times slower."""
    return threshold.unsqueeze(-1).expand(*codes.shape, 2).contiguous()


def _soft_real(parts: torch.Tensor, threshold: torch.Tensor, neg_threshold: torch.Tensor) -> torch.Tensor:
    """soft(x, t) = relu(x − t) − relu(−t − x) on real tensors (cheaper than x − clamp(x, −t, t) with tensor
    bounds)."""
    return torch.relu(parts - threshold) - torch.relu(neg_threshold - parts)


def _shrink_extrapolate(v: torch.Tensor, s: torch.Tensor, threshold: torch.Tensor, neg_threshold: torch.Tensor,
                        alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One FISTA proximal + inertia step on real views: s⁺ = soft(v, t), z = s⁺ + α (s⁺ − s)."""
    s_next = _soft_real(v, threshold, neg_threshold)
    return s_next, torch.lerp(s_next, s, -alpha)


class _CodeBuffers:
    """The code-sized arrays of the untracked FISTA steps, allocated once per solve and reused by every step:
    ``s`` and ``z`` (the iterates), a scratch array and −t; written with ``out=`` so that no step allocates."""

    def __init__(self, like: torch.Tensor):
        self.s, self.z, self.a = (torch.empty_like(like) for _ in range(3))
        self.spare = torch.empty_like(like)
        self.neg_threshold = None

    def step(self, v, s, threshold, alpha):
        """s⁺ = soft(v, t) = v − clamp(v, −t, t) (three passes over the codes instead of six) into a free buffer,
        z = s⁺ + α (s⁺ − s) into ``z``; returns (s⁺, z)."""
        if self.neg_threshold is None:
            self.neg_threshold = -threshold
        s_next = self.spare if s is self.s else self.s
        torch.clamp(v, self.neg_threshold, threshold, out=self.a)
        torch.sub(v, self.a, out=s_next)
        torch.lerp(s_next, s, -alpha, out=self.z)
        if s_next is self.spare:                              # keep s⁺ in self.s, the free one in self.spare
            self.s, self.spare = self.spare, self.s
        return self.s, self.z


def soft_threshold(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Soft-thresholding of the real and imaginary parts of complex ``z`` by a real, non-negative ``threshold``
    (broadcast to ``z``)."""
    t = _real_threshold(threshold.expand(z.shape), z)
    return torch.view_as_complex(_soft_real(torch.view_as_real(z), t, -t))


def fista(forward_step: Step, threshold: torch.Tensor, initial: torch.Tensor, iterations: int,
          grad_iterations: int | None = None, inertia: float = 3.0,
          callback: Callable[[int, torch.Tensor], None] | None = None, compiled: bool = False,
          tolerance: float = 0.0, with_info: bool = False):
    """Run at most ``iterations`` FISTA steps from ``s⁰ = initial`` (usually zeros) and return the last iterate
    (with ``with_info``: the pair (codes, :class:`~recon.stopping.SolveInfo`)).

    forward_step: z ↦ z − τ∇f(z) with τ ≤ 1/L; threshold: τΛ ≥ 0, broadcastable to the codes.
    grad_iterations: how many final steps are differentiated (None: all of them).
    tolerance: the stopping rule: batch item b stops at the first step with ‖s⁺_b − s_b‖ / ‖s⁺_b‖ ≤ tolerance
    (its codes frozen there, :class:`~recon.stopping.StoppingRule`); 0 runs every step. In training the
    undifferentiated steps stop by the rule and the ``grad_iterations`` differentiated ones follow.
    callback(n, s): called after each step (for monitoring; not differentiated).
    compiled: fuse the element-wise work with ``torch.compile`` in the steps that build no autograd graph, when the
    solve is large enough for the compile to pay (:func:`recon.compiled.compile_pays`).
    """
    if inertia <= 2:
        raise ValueError(f"convergent inertia needs a > 2, got {inertia}")
    if grad_iterations is None:
        grad_iterations = iterations
    grad_iterations = max(0, min(grad_iterations, iterations))
    grad = torch.is_grad_enabled() and grad_iterations > 0
    first_tracked = iterations - grad_iterations if grad else iterations
    t_pos = _real_threshold(threshold.expand(initial.shape), initial)
    compiled = compiled and _compiled.compile_pays(initial.numel(), iterations)
    # −t only for the differentiated steps: the compiled kernel and the buffered steps form it themselves
    t_neg = -t_pos if grad else None
    # α_n as 0-d tensors, so a compiled kernel sees one input type for every n
    alphas = [torch.tensor((n - 1) / (n + inertia), dtype=t_pos.dtype, device=t_pos.device)
              for n in range(1, iterations + 1)]
    fused = _compiled.fused_shrink_extrapolate() if compiled else None
    s = z = torch.view_as_real(initial)
    buffers = _CodeBuffers(s) if fused is None and first_tracked > 0 else None
    rule = StoppingRule(initial.shape[0], iterations, tolerance, freeze=not grad)
    n = 0
    with torch.no_grad():  # the undifferentiated steps, until the rule stops every item or the cap
        while n < first_tracked:
            n += 1
            s_prev = s
            v = torch.view_as_real(forward_step(torch.view_as_complex(z)))
            if buffers is not None:  # s_prev stays intact in the spare buffer until the next step
                s, z = buffers.step(v, s, t_pos, alphas[n - 1])
            else:
                s, z = fused(v, s, t_pos, t_neg, alphas[n - 1])
            if callback is not None:  # a copy: the buffers are overwritten by the next step
                callback(n, torch.view_as_complex(s.clone() if buffers is not None else s))
            if (tolerance > 0 or (with_info and n == first_tracked)) and rule.update(
                    n, relative_change(s, s_prev), torch.view_as_complex(s)):
                break
    if not grad:
        return (rule.result(torch.view_as_complex(s)), rule.info()) if with_info else rule.result(
            torch.view_as_complex(s))
    s, z = s.detach().clone(), z.detach().clone()  # the differentiated steps must not see reused buffers
    for tracked in range(grad_iterations):
        n += 1
        s_prev = s
        v = torch.view_as_real(forward_step(torch.view_as_complex(z)))
        s, z = _shrink_extrapolate(v, s, t_pos, t_neg, alphas[min(n, len(alphas)) - 1])
        if callback is not None:
            callback(n, torch.view_as_complex(s.detach()))
    codes = torch.view_as_complex(s)
    if not with_info:
        return codes
    change = relative_change(s.detach(), s_prev.detach()) if grad_iterations else None
    return codes, rule.info(grad_iterations, n, change)
