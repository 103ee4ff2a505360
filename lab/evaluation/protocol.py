"""The evaluation protocol of the multi-coil comparison (docs/evaluation.md, "Protocol"), enforced.

* **One scoring for every method** (:func:`score`): magnitude against the reference, no intensity rescaling for any
  method (every method returns the units of the prewhitened data); SSIM (whole image, inside the anatomy and
  outside it, where the reference is background), NRMSE = ‖|x̂| − ref‖ / ‖ref‖, PSNR. The least-squares scale
  argmin_a ‖a|x̂| − ref‖ is recorded, never applied, as a check that no method is off in intensity.
* **Tuned per setting and per metric** (:func:`tune`): every classical parameter is tuned on the validation split
  for each (matrix, R, SNR), once for the best mean SSIM and once for the lowest mean NRMSE; a method's SSIM
  columns use the first, its NRMSE and PSNR the second.
* **Every grid brackets its optimum**: a best value at either end of a numeric axis extends that axis
  geometrically (same ratio as its last step) and re-tunes; a best value at the axis' lower bound (λ = 0, the
  unregularised limit) is bracketed by the domain. After :data:`MAX_EXTENSIONS` extensions of an axis
  :class:`ProtocolError` is raised and nothing is reported.
* **The λ → 0 check** (:func:`check_zero_filled`): at R = 1 every tuned method, at its best parameters, must be no
  worse on the validation data than its own zero-filled image (same coil maps, the λ → 0 limit of its problem,
  computed apart from the method), within :data:`R1_TOLERANCE`; a failure raises :class:`ProtocolError`. It catches
  a mis-scaled output, a λ = 0 that is not the zero-filled image, and a grid that misses the optimum.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from cdl_lambda.lab import metrics
from cdl_lambda.lab.evaluation.mc_methods import Grid, Method, Params
from cdl_lambda.lab.evaluation.scans import Scan

log = logging.getLogger(__name__)

METRICS = ("ssim", "nrmse")          # the tuning criteria
MAX_EXTENSIONS = 3                   # per numeric axis and setting
R1_TOLERANCE = {"ssim": 0.005, "nrmse": 0.02}  # absolute SSIM, relative NRMSE


class ProtocolError(RuntimeError):
    """The protocol cannot be met: a grid that does not bracket its optimum, or a tuned method worse than its own
    zero-filled image at R = 1. No report is written."""


def score(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The one scoring of every method (module docstring)."""
    magnitude = np.abs(image).astype(np.float64)
    inside = metrics.foreground_mask(reference)[0]
    ref = reference.astype(np.float64)
    return {"ssim": metrics.ssim(ref, magnitude), "ssim_anatomy": metrics.ssim(ref, magnitude, inside),
            "ssim_background": metrics.ssim(ref, magnitude, ~inside),
            "nrmse": float(np.linalg.norm(magnitude - ref) / np.linalg.norm(ref)),
            "psnr": metrics.psnr(ref, magnitude),
            "ls_scale": float((magnitude * ref).sum() / max((magnitude ** 2).sum(), 1e-30))}


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "ssim" else a < b


def _key(params: Params) -> tuple:
    return tuple(sorted(params.items()))


@dataclass
class Tuning:
    """One method in one setting: the best parameters per metric, the final grid, the extensions made, and every
    (parameters, mean scores) tried."""

    best: dict[str, Params]
    grid: Grid
    extensions: dict[str, int]
    table: list[tuple[Params, dict]]

    def at_lower_bound(self, metric: str) -> list[str]:
        return [axis for axis, bound in self.grid.lower_bounds.items() if self.best[metric][axis] == bound]


def _extend(axis: list[float], lower_bound: float | None, index: int) -> bool:
    """Extend ``axis`` past the end at ``index`` geometrically; False when that end is the lower bound."""
    positive = [v for v in axis if v > 0]
    ratio = positive[-1] / positive[-2] if len(positive) >= 2 else 3.0
    if index == len(axis) - 1:
        axis.append(axis[-1] * ratio)
        return True
    if index == 0 and not (lower_bound is not None and axis[0] <= lower_bound):
        axis.insert(0, axis[0] / ratio)
        return True
    return False


def tune_setting(method: Method, scans: list[Scan]) -> Tuning:
    """Tune ``method`` on ``scans`` (one setting) under the bracketing rule (module docstring)."""
    grid = Grid({k: list(v) for k, v in method.grid.numeric.items()}, dict(method.grid.lower_bounds),
                {k: list(v) for k, v in method.grid.choices.items()})
    means: dict[tuple, dict] = {}
    extensions = {axis: 0 for axis in grid.numeric}
    while True:
        for params in grid.points():
            if _key(params) not in means:
                rows = [score(method.run(scan, params), scan.reference) for scan in scans]
                means[_key(params)] = {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}
        points = grid.points()
        best = {}
        for metric in METRICS:
            best[metric] = points[0]
            for params in points[1:]:
                if _better(metric, means[_key(params)][metric], means[_key(best[metric])][metric]):
                    best[metric] = params
        extended = False
        for metric in METRICS:
            for axis, values in grid.numeric.items():
                index = values.index(best[metric][axis])
                if index in (0, len(values) - 1) and _extend(values, grid.lower_bounds.get(axis), index):
                    extensions[axis] += 1
                    extended = True
                    if extensions[axis] > MAX_EXTENSIONS:
                        raise ProtocolError(
                            f"{method.id}: the {axis} grid does not bracket the best {metric} at "
                            f"{scans[0].setting} after {MAX_EXTENSIONS} extensions (values tried: "
                            f"{', '.join(f'{v:g}' for v in values)})")
                    break
            if extended:
                break
        if not extended:
            table = [(p, means[_key(p)]) for p in points]
            return Tuning(best, grid, extensions, table)


def tune(method: Method, scans: list[Scan]) -> dict[tuple, Tuning]:
    """:func:`tune_setting` for every setting among ``scans``."""
    out = {}
    for setting in sorted({s.setting for s in scans}):
        group = [s for s in scans if s.setting == setting]
        out[setting] = tune_setting(method, group)
        t = out[setting]
        log.info("tuned %s at %s: SSIM-best %s, NRMSE-best %s (extensions %s)", method.id, setting,
                 t.best["ssim"], t.best["nrmse"], t.extensions)
    return out


@dataclass
class Result:
    """Per (split, setting): the metric rows of each scan; and the time spent."""

    method: str
    rows: dict = field(default_factory=dict)      # (split, size, R, snr) -> list of metric dicts
    seconds: float = 0.0
    count: int = 0

    def mean(self, split: str, setting: tuple) -> dict[str, float]:
        rows = self.rows.get((split, *setting), [])
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}

    def to_json(self) -> dict:
        return {"method": self.method, "seconds": self.seconds, "count": self.count,
                "rows": [[list(k), v] for k, v in self.rows.items()]}

    @classmethod
    def from_json(cls, data: dict) -> "Result":
        return cls(data["method"], {tuple(k): v for k, v in data["rows"]}, data["seconds"], data["count"])


SSIM_KEYS = ("ssim", "ssim_anatomy", "ssim_background")


def evaluate(method: Method, scans: list[Scan], tuned: dict[tuple, Tuning] | None = None) -> Result:
    """Score ``method`` on every scan; a tuned method's SSIM columns come from its SSIM-best parameters and its
    NRMSE, PSNR and scale from its NRMSE-best ones (one run when they agree)."""
    result = Result(method.id)
    for scan in scans:
        best = tuned[scan.setting].best if tuned else {"ssim": None, "nrmse": None}
        start = time.perf_counter()
        by_ssim = score(method.run(scan, best["ssim"]), scan.reference)
        result.seconds += time.perf_counter() - start
        result.count += 1
        by_nrmse = by_ssim if best["nrmse"] == best["ssim"] else score(method.run(scan, best["nrmse"]),
                                                                       scan.reference)
        row = {k: (by_ssim if k in SSIM_KEYS else by_nrmse)[k] for k in by_ssim}
        result.rows.setdefault((scan.split, *scan.setting), []).append(row)
    return result


def check_zero_filled(method: Method, scans: list[Scan], tuned: dict[tuple, Tuning]) -> list[str]:
    """The λ → 0 check at R = 1 (module docstring) on the validation ``scans`` the method was tuned on: its mean
    score at its best parameters against that of its own zero-filled image (computed apart from the method, with
    the same coil maps). Returns one line per setting and metric; raises :class:`ProtocolError` on a failure."""
    lines = []
    for setting in sorted({s.setting for s in scans if s.acceleration == 1}):
        group = [s for s in scans if s.setting == setting]
        tuning = tuned[setting]
        for metric in METRICS:
            params = tuning.best[metric]
            ours = next(means for p, means in tuning.table if p == params)[metric]
            theirs = float(np.mean([score(method.zero_filled(s, params), s.reference)[metric] for s in group]))
            if metric == "ssim":
                ok = ours >= theirs - R1_TOLERANCE["ssim"]
            else:
                ok = ours <= theirs * (1 + R1_TOLERANCE["nrmse"])
            line = (f"{method.id}, {setting[0]}² R=1 SNR {setting[2]:g}: {metric.upper()} {ours:.3f} at "
                    f"{', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())} "
                    f"vs its zero-filled {theirs:.3f} "
                    f"({'ok' if ok else 'FAILED'})")
            lines.append(line)
            if not ok:
                raise ProtocolError("λ → 0 check failed: " + line)
    return lines
