"""``torch.compile`` plumbing of the solvers: whether a compiler exists, where kernels are cached between processes,
when a compile pays, and FISTA's fused element-wise kernel with its fallback to eager code.

Nothing here changes the maths: :mod:`recon.solvers` runs the same step compiled or not.
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


def compile_available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels here: Triton on CUDA, a C++ compiler on the CPU."""
    if device.type == "cuda":
        return True
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


def _shrink_extrapolate_one_threshold(v: torch.Tensor, s: torch.Tensor, threshold: torch.Tensor,
                                      alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One FISTA proximal + inertia step on real views, s⁺ = soft(v, t), z = s⁺ + α (s⁺ − s), with −t formed
    inside the kernel (one threshold array read instead of two)."""
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


def fused_shrink_extrapolate() -> Callable:
    """FISTA's fused element-wise kernel (``torch.compile``: one pass over the codes instead of six), called as
    ``kernel(v, s, threshold, neg_threshold, alpha)``. A compiler failure at first use falls back to the same
    maths uncompiled, with a warning."""
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
