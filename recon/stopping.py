"""The stopping rule the solvers share: stop each batch item at the first iteration where its convergence
measure (a relative change or residual) is at most ``tolerance``, with the iteration count capped.

Batch items are independent problems, so an item that has stopped is frozen (its iterate copied out) while the
others go on: a slice's result does not depend on the batch it came in. ``tolerance`` 0 never stops early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SolveInfo:
    """Per batch item: ``iterations`` used (int64 ``(B,)``, CPU) and the final convergence measure ``(B,)``."""

    iterations: torch.Tensor
    relative_change: torch.Tensor


class StoppingRule:
    """Tracks, per item, whether it has stopped, when, and its iterate at that moment.

    ``freeze``: keep a copy of each stopped item's iterate (inference); without it (training, where the
    differentiated tail continues every item) only the counts are kept."""

    def __init__(self, batch: int, cap: int, tolerance: float, freeze: bool = True):
        self.tolerance, self.freeze = tolerance, freeze
        self.used = torch.full((batch,), cap, dtype=torch.int64)
        self.final = torch.full((batch,), float("nan"))
        self.done = torch.zeros(batch, dtype=torch.bool)
        self._frozen: torch.Tensor | None = None

    def update(self, n: int, measure: torch.Tensor, iterate: torch.Tensor) -> bool:
        """Record iteration ``n``'s measure ``(B,)`` for the running items; True when every item has stopped."""
        measure = measure.detach().float().cpu()
        self.final = torch.where(self.done, self.final, measure)
        if self.tolerance <= 0:
            return False
        newly = (measure <= self.tolerance) & ~self.done
        if bool(newly.any()):
            self.used[newly] = n
            self.done |= newly
            if self.freeze:
                index = newly.nonzero().flatten().to(iterate.device)
                if self._frozen is None:
                    self._frozen = iterate.detach().clone()
                else:
                    self._frozen[index] = iterate[index]
        return bool(self.done.all())

    def result(self, iterate: torch.Tensor) -> torch.Tensor:
        """The solve's output: each stopped item's frozen iterate, the running items' current one."""
        if self._frozen is None:
            return iterate
        running = (~self.done).nonzero().flatten().to(iterate.device)
        self._frozen[running] = iterate[running]
        return self._frozen

    def info(self, extra_iterations: int = 0, last: int | None = None,
             final: torch.Tensor | None = None) -> SolveInfo:
        """The counts; ``extra_iterations`` differentiated steps run after the stop, ``last`` the total run."""
        used = self.used
        if extra_iterations:
            used = torch.where(self.done, used + extra_iterations, torch.full_like(used, last))
        return SolveInfo(used, self.final if final is None else final.detach().float().cpu())


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """‖new − old‖ / ‖new‖ per batch item (real or complex tensors ``(B, …)``)."""
    new_r = torch.view_as_real(new) if new.is_complex() else new
    old_r = torch.view_as_real(old) if old.is_complex() else old
    difference = (new_r - old_r).pow(2).flatten(1).sum(dim=1)
    size = new_r.pow(2).flatten(1).sum(dim=1).clamp_min(torch.finfo(new_r.dtype).tiny)
    return (difference / size).sqrt()
