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

import functools
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

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
    ``s`` and ``z`` (the iterates) and two scratch arrays; written with ``out=`` so that no step allocates."""

    def __init__(self, like: torch.Tensor):
        self.s, self.z, self.a, self.b = (torch.empty_like(like) for _ in range(4))
        self.spare = torch.empty_like(like)

    def step(self, v, s, threshold, alpha):
        """s⁺ = soft(v, t) into a free buffer, z = s⁺ + α (s⁺ − s) into ``z``; returns (s⁺, z)."""
        s_next = self.spare if s is self.s else self.s
        torch.sub(v, threshold, out=self.a).relu_()           # relu(v − t)
        torch.add(v, threshold, out=self.b).neg_().relu_()    # relu(−t − v)
        torch.sub(self.a, self.b, out=s_next)
        torch.lerp(s_next, s, -alpha, out=self.z)
        if s_next is self.spare:                              # keep s⁺ in self.s, the free one in self.spare
            self.s, self.spare = self.spare, self.s
        return self.s, self.z


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels here: Triton on CUDA, a C++ compiler on the CPU."""
    if device.type == "cuda":
        return True
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def _shrink_extrapolate_one_threshold(v: torch.Tensor, s: torch.Tensor, threshold: torch.Tensor,
                                      alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_shrink_extrapolate` with −t formed inside the kernel (one threshold array read instead of two)."""
    s_next = torch.relu(v - threshold) - torch.relu(-threshold - v)
    return s_next, torch.lerp(s_next, s, -alpha)


# torch's own torch/utils/mkldnn.py still decorates with torch.jit.script_method, which warns when torch.compile
# first imports inductor; nothing in this package uses TorchScript
_SCRIPT_METHOD_WARNING = r"`torch\.jit\.script_method` is deprecated"


def compile_cache_dir() -> Path:
    """Where compiled kernels persist between processes: ``$TORCHINDUCTOR_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/cdl-lambda/inductor`` (``~/.cache/…``), so that a new process (Gadgetron's active mode starts
    one per scan) loads the kernels instead of compiling them again, also after a reboot empties /tmp."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cdl-lambda" / "inductor"


@functools.lru_cache(maxsize=None)
def _compiled_kernel():
    folder = compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))  # read by inductor when it compiles
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    except OSError as error:  # read-only home: torch's default cache in the temporary folder
        log.warning("compile cache %s is not writable (%s); using torch's default", folder, error)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCRIPT_METHOD_WARNING, category=DeprecationWarning)
        import torch._inductor.compile_fx  # noqa: F401 - the import that warns, done here once
        return torch.compile(_shrink_extrapolate_one_threshold, dynamic=None)


_compiled_shapes: set = set()

# torch.compile pays only when the element-wise work it saves exceeds its own cost: about 0.1 µs per complex code
# and iteration saved on a CPU core against 2 s to trace and load a cached kernel (more for a first compile), so
# a solve smaller than this many code-iterations stays eager (a one-slice 64² scan, the tests)
COMPILE_MIN_WORK = 20_000_000


def compile_pays(codes: int, iterations: int) -> bool:
    """Whether fusing a solve of ``codes`` complex codes over ``iterations`` steps is worth a compile."""
    return codes * iterations >= COMPILE_MIN_WORK


def _announce_compile(v: torch.Tensor):
    """Log the one-off compile of the kernel for a new code shape (the call that compiles takes seconds)."""
    key = (tuple(v.shape), v.dtype, v.device.type)
    if key in _compiled_shapes:
        return None
    _compiled_shapes.add(key)
    log.info("compiling the FISTA kernel for codes %s on %s (once per shape and process; kernels are cached in %s)",
             "×".join(map(str, v.shape[:-1])), v.device.type, os.environ.get("TORCHINDUCTOR_CACHE_DIR", "the default"))
    return time.perf_counter()


def shrink_extrapolate_kernel(compiled: bool) -> Callable:
    """The fused element-wise kernel (``torch.compile``: one pass over the codes instead of six) or the eager one.
    A compiler failure at first use falls back to eager with a warning."""
    if not compiled:
        return _shrink_extrapolate
    kernel = _compiled_kernel()

    def guarded(v, s, threshold, neg_threshold, alpha):
        nonlocal kernel
        try:
            if kernel is _shrink_extrapolate_one_threshold:
                return kernel(v, s, threshold, alpha)
            start = _announce_compile(v)
            result = kernel(v, s, threshold, alpha)
            if start is not None:
                log.info("FISTA kernel ready in %.1f s", time.perf_counter() - start)
            return result
        except Exception as error:  # no working compiler, unsupported backend, ...
            if kernel is _shrink_extrapolate_one_threshold:
                raise
            log.warning("torch.compile of the FISTA kernel failed (%s); continuing uncompiled", error)
            kernel = _shrink_extrapolate_one_threshold
            return kernel(v, s, threshold, alpha)

    return guarded


def soft_threshold(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Soft-thresholding of the real and imaginary parts of complex ``z`` by a real, non-negative ``threshold``
    (broadcast to ``z``)."""
    t = _real_threshold(threshold.expand(z.shape), z)
    return torch.view_as_complex(_soft_real(torch.view_as_real(z), t, -t))


def fista(forward_step: Step, threshold: torch.Tensor, initial: torch.Tensor, iterations: int,
          grad_iterations: int | None = None, inertia: float = 3.0,
          callback: Callable[[int, torch.Tensor], None] | None = None, compiled: bool = False) -> torch.Tensor:
    """Run ``iterations`` FISTA steps from ``s⁰ = initial`` (usually zeros) and return the last iterate.

    forward_step: z ↦ z − τ∇f(z) with τ ≤ 1/L; threshold: τΛ ≥ 0, broadcastable to the codes.
    grad_iterations: how many final steps are differentiated (None: all of them).
    callback(n, s): called after each step (for monitoring; not differentiated).
    compiled: fuse the element-wise work with ``torch.compile`` in the steps that build no autograd graph, when the
    solve is large enough for the compile to pay (:func:`compile_pays`).
    """
    if inertia <= 2:
        raise ValueError(f"convergent inertia needs a > 2, got {inertia}")
    if grad_iterations is None:
        grad_iterations = iterations
    grad_iterations = max(0, min(grad_iterations, iterations))
    first_tracked = iterations - grad_iterations
    t_pos = _real_threshold(threshold.expand(initial.shape), initial)
    compiled = compiled and compile_pays(initial.numel(), iterations)
    # −t only for the differentiated steps: the compiled kernel and the buffered steps form it themselves
    t_neg = -t_pos if grad_iterations > 0 and torch.is_grad_enabled() else None
    # α_n as 0-d tensors, so a compiled kernel sees one input type for every n
    alphas = [torch.tensor((n - 1) / (n + inertia), dtype=t_pos.dtype, device=t_pos.device)
              for n in range(1, iterations + 1)]
    fused = shrink_extrapolate_kernel(compiled) if compiled else None
    s = z = torch.view_as_real(initial)
    untracked_steps = first_tracked if torch.is_grad_enabled() else iterations
    buffers = _CodeBuffers(s) if fused is None and untracked_steps > 0 else None
    for n in range(1, iterations + 1):
        tracked = n > first_tracked and torch.is_grad_enabled()
        if n == first_tracked + 1 and torch.is_grad_enabled():  # the differentiated steps begin
            s, z = s.detach(), z.detach()
            if buffers is not None:  # they must not see buffers that later steps would overwrite
                s, z, buffers = s.clone(), z.clone(), None
        with torch.set_grad_enabled(tracked):
            v = torch.view_as_real(forward_step(torch.view_as_complex(z)))
            if tracked:
                s, z = _shrink_extrapolate(v, s, t_pos, t_neg, alphas[n - 1])
            elif buffers is not None:
                s, z = buffers.step(v, s, t_pos, alphas[n - 1])
            else:
                s, z = fused(v, s, t_pos, t_neg, alphas[n - 1])
        if callback is not None:  # a copy: the buffers are overwritten by the next step
            callback(n, torch.view_as_complex(s.detach().clone() if buffers is not None else s.detach()))
    return torch.view_as_complex(s)
