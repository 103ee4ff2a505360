"""Validation curves of training runs, read from their checkpoints: a figure and a Markdown table.

A run's checkpoint (``lab.train.Trainer``) keeps its whole history, one entry per validation:
``{"step", "seconds", "train_loss", "val_loss", "val_ssim", ...}``, continued across ``--resume``. A run is judged to
have *plateaued* when the second half of its validations shows no significant fall: the least-squares slope of
validation loss against step over that half is not below −2 standard errors (t > −2). A run still gaining is
told apart from one whose validation merely scatters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    def slope_t(self) -> float | None:
        """t statistic of the least-squares slope of the validation loss over the second half of the run (None
        with fewer than 4 validations there)."""
        half = len(self.val_loss) // 2
        steps, loss = np.array(self.steps[half:], float), np.array(self.val_loss[half:], float)
        if len(steps) < 4:
            return None
        centred = steps - steps.mean()
        slope = float(centred @ (loss - loss.mean()) / (centred @ centred))
        residual = loss - loss.mean() - slope * centred
        error = float(np.sqrt(residual @ residual / (len(steps) - 2) / (centred @ centred)))
        return slope / error if error > 0 else float(np.copysign(np.inf, slope) if slope else 0.0)

    @property
    def plateaued(self) -> bool | None:
        """No significant fall of the validation loss over the second half (t > −2); None with too few points."""
        t = self.slope_t
        return None if t is None else t > -2


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
        verdict = ("too few validations" if c.plateaued is None else
                   f"{'yes' if c.plateaued else 'no'} (t = {c.slope_t:.1f})")
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
