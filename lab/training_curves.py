"""Validation curves of training runs, read from their checkpoints: a figure and a Markdown table.

A run's checkpoint (``lab.train.Trainer``) keeps its whole history, one entry per validation:
``{"step", "seconds", "train_loss", "val_loss", "val_ssim", ...}``, continued across ``--resume``. A run is judged
to have *plateaued* when the best validation loss of its last half is no better than the best of its first half
by more than the spread (max − min) of its last half — i.e. what it gained since is inside the noise of the
validation itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Curve:
    """One run's validation history."""
    label: str
    steps: list[int]
    minutes: list[float]
    val_loss: list[float]
    val_ssim: list[float | None]

    @property
    def plateaued(self) -> bool | None:
        """Whether the second half gained less than its own spread (None below 4 validations)."""
        n = len(self.val_loss)
        if n < 4:
            return None
        first, last = self.val_loss[: n // 2], self.val_loss[n // 2:]
        return min(first) - min(last) <= max(last) - min(last)


def read_curve(label: str, checkpoint: str | Path, offset_minutes: float = 0.0) -> Curve:
    """The validation history stored in ``checkpoint``; a checkpoint without one is refused by name.
    ``offset_minutes``: the training its starting weights had already had (a fine-tune's earlier runs)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    history = [h for h in state.get("history") or [] if "val_loss" in h]
    if not history:
        raise ValueError(f"{checkpoint}: no validation history (not a training checkpoint, or never validated)")
    return Curve(label, [int(h["step"]) for h in history], [offset_minutes + h["seconds"] / 60 for h in history],
                 [float(h["val_loss"]) for h in history], [h.get("val_ssim") for h in history])


def table(curves: list[Curve]) -> str:
    """Markdown: per run its steps, minutes, first/best/last validation loss and SSIM, and the plateau verdict."""
    rows = ["| run | steps | CPU minutes in all | val loss first → best (step) → last | val SSIM first → last "
            "| plateaued |", "|---|---|---|---|---|---|"]
    for c in curves:
        best = min(range(len(c.val_loss)), key=c.val_loss.__getitem__)
        ssim = (f"{c.val_ssim[0]:.4f} → {c.val_ssim[-1]:.4f}" if c.val_ssim[0] is not None
                and c.val_ssim[-1] is not None else "–")
        verdict = {None: "too few validations", True: "yes", False: "no"}[c.plateaued]
        rows.append(f"| {c.label} | {c.steps[-1]} | {c.minutes[-1]:.0f} | {c.val_loss[0]:.5f} → "
                    f"{c.val_loss[best]:.5f} ({c.steps[best]}) → {c.val_loss[-1]:.5f} | {ssim} | {verdict} |")
    return "\n".join(rows) + "\n"


def plot(curves: list[Curve], output: str | Path) -> Path:
    """Validation loss and SSIM against CPU minutes, one line per run, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, ssim_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for c in curves:
        loss_axis.plot(c.minutes, c.val_loss, marker="o", markersize=3, label=c.label)
        if all(s is not None for s in c.val_ssim):
            ssim_axis.plot(c.minutes, c.val_ssim, marker="o", markersize=3, label=c.label)
    loss_axis.set(xlabel="CPU minutes of training", ylabel="validation relative squared error")
    ssim_axis.set(xlabel="CPU minutes of training", ylabel="validation SSIM")
    for axis in (loss_axis, ssim_axis):
        axis.grid(alpha=0.3)
    loss_axis.legend(fontsize=8)
    figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output
