"""Whether an image can be trusted: the k-space a slice group actually holds against what its header and its own
sampling pattern say it should hold, and the final data residual against the noise.

A slice is ``incomplete`` (:data:`INCOMPLETE`) when any of these holds (thresholds measured in
``docs/site-safety.md``):

- it **ended before its last line**: it was handed out by the end of the measurement or of the stream, not by a
  readout flagged ``ACQ_LAST_IN_SLICE``, while the scan marks its slices' last lines with that flag;
- it **misses its k-space centre**: no measured line within one sampling step of the centre (E1, and E2 for 3-D);
- it **misses more than** :data:`MAX_MISSING_FRACTION` **of its expected lines**. Expected lines along E1 (and E2): the
  encoding limits' range (the whole encoded matrix when the header has none) sampled with the step and offset the
  group's own lines outside its calibration region show (the step seen in at least 3/4 of the gaps), plus the
  calibration lines it measured. When the lines follow no regular step (random sampling) the expected count is the
  range over the header's acceleration factor;
- after reconstruction, its **data residual over the noise** ``‖A x − y‖ / (σ √M)`` is outside
  :data:`RESIDUAL_BAND` (a fit far from the noise level: data that do not fit the model, a wrong noise level).
  Checked only when σ was measured (a noise scan); a σ estimated from the slice's own k-space is itself a fit to
  those data, so the ratio is then reported (``CDL_ResidualToNoise``) but decides nothing.

A slice that could not be reconstructed at all is ``not-reconstructed`` (:data:`NOT_RECONSTRUCTED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OK, INCOMPLETE, NOT_RECONSTRUCTED = "ok", "incomplete", "not-reconstructed"

MAX_MISSING_FRACTION = 0.05   # expected lines a slice may lack and still count as complete
RESIDUAL_BAND = (0.75, 1.25)  # data residual / noise of a trustworthy fit
RESIDUAL_MIN_ITERATIONS = 8   # below this the solve has not reached the noise: the residual says nothing of the data
                              # (the background weight's image term shrinks FISTA's step: complete scans stop at
                              # 1.28-1.41 after 4 iterations, inside the band from 6)
REGULAR_SHARE = 0.75          # share of gaps between outer lines that must equal the step for a regular pattern

# How a slice group was handed out by the buffer.
ENDED_BY_FLAG, ENDED_BY_MEASUREMENT, ENDED_BY_STREAM = "last-in-slice", "end-of-measurement", "end-of-stream"


@dataclass
class Assessment:
    """A slice's status and the reasons for it (empty when ``ok``), with the line counts behind them."""

    status: str = OK
    reasons: list = field(default_factory=list)
    measured_lines: int = 0
    expected_lines: int = 0

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def add(self, reason: str) -> None:
        self.reasons.append(reason)
        if self.status == OK:
            self.status = INCOMPLETE


@dataclass
class LineCheck:
    measured: int
    expected: int
    missing: int
    centre_missed: bool


def _step_and_offset(outer: np.ndarray, header_step: int) -> tuple[int, int, bool]:
    """(step, offset, regular) of the sorted line indices ``outer`` (lines outside the calibration region)."""
    if outer.size >= 3:
        gaps = np.diff(outer)
        gaps = gaps[gaps > 0]
        values, counts = np.unique(gaps, return_counts=True)
        step = int(values[np.argmax(counts)])
        if counts.max() >= REGULAR_SHARE * gaps.size:
            offsets, hits = np.unique(outer % step, return_counts=True)
            return step, int(offsets[np.argmax(hits)]), True
        return max(header_step, 1), 0, False
    step = max(header_step, 1)
    return step, int(outer[0] % step) if outer.size else 0, outer.size > 0 or step == 1


def check_lines(measured: np.ndarray, calibration: np.ndarray | None, span: tuple[int, int], centre: int,
                header_step: int = 1, calibration_in_data: bool = True) -> LineCheck:
    """Compare the measured lines of one axis (``measured`` bool ``(n,)``, ``calibration`` the calibration lines or
    None) with the lines expected over ``span`` (first, last index, inclusive) for the pattern seen."""
    n = measured.size
    first, last = max(int(span[0]), 0), min(int(span[1]), n - 1)
    calib = np.zeros(n, bool) if calibration is None else np.asarray(calibration, bool)
    lines = np.flatnonzero(measured)
    outer = np.flatnonzero(measured & ~calib)
    step, offset, regular = _step_and_offset(outer if outer.size else lines, header_step)
    inside = np.arange(first, last + 1)
    if regular:
        expected = np.zeros(n, bool)
        expected[inside[inside % step == offset]] = True
        if calibration_in_data:
            expected[first:last + 1] |= calib[first:last + 1]
        expected_count = int(expected.sum())
        missing = int((expected & ~measured).sum())
    else:
        expected_count = int(np.ceil(inside.size / step))
        missing = max(expected_count - int(measured[first:last + 1].sum()), 0)
    near = np.abs(lines - centre) < step if lines.size else np.zeros(0, bool)
    return LineCheck(measured=int(lines.size), expected=expected_count, missing=missing, centre_missed=not near.any())


def assess_group(mask: np.ndarray, calibration_rows: np.ndarray | None, encoding, ended: str,
                 slice_flags_in_use: bool, calibration_in_data: bool = True) -> Assessment:
    """The assessment of one buffered slice group: ``mask`` ``(nz, ny, nx)`` of measured samples,
    ``calibration_rows`` ``(nz, ny)`` bool of its own calibration lines (or None), ``encoding`` a
    :class:`gadgets.encoding.Encoding`, ``ended`` how the buffer handed it out (``ENDED_BY_*``)."""
    result = Assessment()
    if ended != ENDED_BY_FLAG and slice_flags_in_use:
        result.add(f"ended before its last line (handed out at the {ended.replace('-', ' ')} without a readout "
                   "flagged last in slice)")
    axes = [("E1", mask.any(axis=(0, 2)), None if calibration_rows is None else calibration_rows.any(axis=0),
             encoding.e1_range, encoding.e1_center, encoding.ny, encoding.acceleration[0])]
    if encoding.nz > 1:
        axes.append(("E2", mask.any(axis=(1, 2)), None if calibration_rows is None else calibration_rows.any(axis=1),
                     encoding.e2_range, encoding.e2_center, encoding.nz, encoding.acceleration[1]))
    for name, measured, calib, counters, centre_counter, n, header_step in axes:
        shift = n // 2 - centre_counter  # buffer index = counter + shift
        span = (counters[0] + shift, counters[1] + shift) if counters else (0, n - 1)
        check = check_lines(measured, calib, span, n // 2, header_step, calibration_in_data)
        if name == "E1":
            result.measured_lines, result.expected_lines = check.measured, check.expected
        if check.centre_missed:
            result.add(f"misses its k-space centre ({name} {centre_counter} and its neighbours not measured)")
        if check.expected and check.missing > MAX_MISSING_FRACTION * check.expected:
            result.add(f"misses {check.missing} of its {check.expected} expected {name} lines "
                       f"({100 * check.missing / check.expected:.0f} % > {100 * MAX_MISSING_FRACTION:.0f} %)")
    return result


def residual_reason(residual_to_noise: float | None, noise_measured: bool = True,
                    iterations: int | None = None) -> str:
    """Why a data residual over the noise is not trustworthy ("" when it is inside :data:`RESIDUAL_BAND`, unknown,
    the noise level was estimated rather than measured (``noise_measured`` False), or the solve ran fewer than
    :data:`RESIDUAL_MIN_ITERATIONS` ``iterations``: a 2-iteration solve of a complete 48² scan stops at 1.31, and with
    the background weight a 4-iteration solve of a complete 32² or 128² scan at 1.41 or 1.28)."""
    if not noise_measured or residual_to_noise is None:
        return ""
    if iterations is not None and iterations < RESIDUAL_MIN_ITERATIONS and np.isfinite(residual_to_noise):
        return ""
    if not np.isfinite(residual_to_noise):
        return "data residual is not finite"
    low, high = RESIDUAL_BAND
    if residual_to_noise > high:
        return (f"data residual {residual_to_noise:.2f}x the noise (> {high}): the data do not fit "
                "(missing or corrupt lines, motion, a wrong noise level)")
    if residual_to_noise < low:
        return (f"data residual {residual_to_noise:.2f}x the noise (< {low}): the fit follows the noise "
                "(a wrong noise level?)")
    return ""
