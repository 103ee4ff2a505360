"""FISTA with convergent-iterates inertia (Chambolle & Dossal 2015) and truncated back-propagation.

Solves min_s f(s) + Σ ‖Λ ⊙ Re s‖₁ + ‖Λ ⊙ Im s‖₁ for complex codes s, given ∇f:

    s^{n+1} = soft(z^n − τ ∇f(z^n), τ Λ)         (on real and imaginary parts)
    z^{n+1} = s^{n+1} + α_n (s^{n+1} − s^n),      α_n = (t_n − 1) / t_{n+1} = (n − 1) / (n + a),
    t_n = (n + a − 1) / a,  a > 2,  s⁰ = z⁰ = 0.

With a > 2 the iterates converge (not only the objective), which keeps the unrolled scheme a genuine convex solver
for fixed Λ. The first ``iterations − grad_iterations`` steps run without building an autograd graph; gradients flow
only through the last ``grad_iterations`` steps, so training memory grows with that number, not with ``iterations``.
"""

from __future__ import annotations

from typing import Callable

import torch


def soft_threshold(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Soft-thresholding of the real and imaginary parts of complex ``z`` by a real, non-negative ``threshold``
    (broadcast): soft(x, t) = x − clamp(x, −t, t)."""
    parts = torch.view_as_real(z)
    t = threshold.unsqueeze(-1)
    return torch.view_as_complex(parts - torch.clamp(parts, -t, t))


def fista(gradient: Callable[[torch.Tensor], torch.Tensor], threshold: torch.Tensor, initial: torch.Tensor,
          step: float, iterations: int, grad_iterations: int | None = None, inertia: float = 3.0,
          callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run ``iterations`` FISTA steps from ``s⁰ = initial`` (usually zeros) and return the last iterate.

    gradient: z ↦ ∇f(z); threshold: Λ ≥ 0 broadcastable to the codes; step: τ ≤ 1/L.
    grad_iterations: how many final steps are differentiated (None: all of them).
    callback(n, s): called after each step (for monitoring; not differentiated).
    """
    if inertia <= 2:
        raise ValueError(f"convergent inertia needs a > 2, got {inertia}")
    if grad_iterations is None:
        grad_iterations = iterations
    grad_iterations = max(0, min(grad_iterations, iterations))
    first_tracked = iterations - grad_iterations
    tau_threshold = step * threshold
    s = z = initial
    for n in range(1, iterations + 1):
        tracked = n > first_tracked
        if n == first_tracked + 1:
            s, z = s.detach(), z.detach()
        with torch.set_grad_enabled(tracked and torch.is_grad_enabled()):
            s_next = soft_threshold(z - step * gradient(z), tau_threshold)
            alpha = (n - 1) / (n + inertia)
            z = s_next + alpha * (s_next - s) if alpha else s_next
            s = s_next
        if callback is not None:
            callback(n, s.detach())
    return s
