"""Tissue contrasts synthesised from a T1-weighted head: tissue fractions, low-field relaxation, signal equations.

A T1-weighted stack is split into fractions of four tissues (:func:`tissue_fractions`): cerebrospinal fluid, grey
matter, white matter and fat (scalp, marrow), by the intensity centres of CSF, GM and WM (:func:`tissue_levels`,
a 1-D k-means). Between two neighbouring centres a pixel is a linear mix of the two tissues (partial volume); from 0
to the CSF centre it fades from background to CSF; above the WM centre it mixes WM with fat, fat reaching 1 at the
stack's maximum. The fractions sum to 1 inside the head and 0 in the background.

A contrast is Σ_t f_t · S_t with the spin-echo and inversion-recovery signals of each tissue

    spin echo:          S = ρ (1 − e^(−TR/T1)) e^(−TE/T2)
    inversion recovery: S = ρ |1 − 2 e^(−TI/T1) + e^(−TR/T1)| e^(−TE/T2)

with relaxation times of brain at 50–65 mT (:data:`RELAXATION`, rounded from published in-vivo low-field maps;
at low field T1 is much shorter than at 1.5 T, T2 about the same) and sequence timings drawn from ranges typical
of each weighting (:data:`WEIGHTINGS`: T1 weighting by inversion recovery, as low-field scanners do it; FLAIR's TI
near the CSF null). Each draw also perturbs the relaxation times (:func:`tissue_signals`), so the network never sees
one exact tissue ratio.
"""

from __future__ import annotations

import numpy as np

from cdl_lambda.lab.images import normalise

TISSUES = ("csf", "gm", "wm", "fat")

# T2-weighted intensities of CSF, grey and white matter relative to CSF (long-TR spin echo, TE ≈ 100 ms at low
# field) for :func:`t2_weighted`; the same ratios as the T2w-like synthesis of the MNI152 source in lab.images.
T2_LEVELS = (1.0, 0.6, 0.35)

# (T1 ms, T2 ms, proton density): CSF, grey matter, white matter, fat at 50–65 mT.
RELAXATION = {"csf": (3700.0, 1600.0, 1.0), "gm": (330.0, 100.0, 0.82), "wm": (275.0, 80.0, 0.70),
              "fat": (120.0, 110.0, 0.90)}

# weighting: (TR range ms, TE range ms, inversion). The inversion is None (spin echo), ("ms", range) or
# ("csf-null", range of fractions of the TI that nulls CSF). T1 weighting at low field needs an inversion: with
# spin echo the higher proton density of grey matter cancels its longer T1 and GM ≈ WM.
WEIGHTINGS = {"t1": ((1000.0, 1600.0), (8.0, 16.0), ("ms", (320.0, 380.0))),
              "t2": ((2000.0, 4500.0), (80.0, 140.0), None),
              "pd": ((1500.0, 3500.0), (8.0, 25.0), None),
              "flair": ((5000.0, 9000.0), (80.0, 130.0), ("csf-null", (0.95, 1.05)))}


def tissue_levels(stack: np.ndarray, classes: int = 3, iterations: int = 30) -> np.ndarray:
    """Centres of ``classes`` intensity classes (1-D k-means, ascending) of the anatomy of a T1 stack: in a T1 head
    the darkest is CSF, then grey and white matter."""
    values = stack[stack > 0.1 * np.percentile(stack, 99.5)]
    centres = np.linspace(*np.percentile(values, [2, 98]), classes)
    for _ in range(iterations):
        labels = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        centres = np.array([values[labels == k].mean() if (labels == k).any() else centres[k]
                            for k in range(classes)])
    return np.sort(centres)


def tissue_fractions(t1_stack: np.ndarray) -> np.ndarray:
    """Fractions of :data:`TISSUES` in every pixel of a T1-weighted stack ``(n, ny, nx)``: float32
    ``(n, 4, ny, nx)``, each the piecewise-linear "hat" of its tissue over the knots 0, CSF, GM, WM, maximum."""
    csf, gm, wm = tissue_levels(t1_stack)
    top = max(float(t1_stack.max()), wm * 1.01)
    knots = [0.0, csf, gm, wm, top]
    hats = np.eye(5)[1:]  # one row per tissue: 1 at its own knot, 0 at the others
    return np.stack([np.interp(t1_stack, knots, hat) for hat in hats], axis=1).astype(np.float32)


def tissue_signals(weighting: str, rng: np.random.Generator) -> np.ndarray:
    """Signals ``(4,)`` of :data:`TISSUES` for one random draw of ``weighting``'s timings and of the relaxation
    times (all T1 and all T2 scaled together by up to ±7 %, each tissue's T1, T2 and ρ by up to ±3 % more)."""
    (tr_low, tr_high), (te_low, te_high), inversion = WEIGHTINGS[weighting]
    tr, te = rng.uniform(tr_low, tr_high), rng.uniform(te_low, te_high)
    nominal = np.array([RELAXATION[t] for t in TISSUES])  # (4, 3): T1, T2, ρ
    scale = np.array([rng.uniform(0.93, 1.07), rng.uniform(0.93, 1.07), 1.0])
    t1, t2, rho = (nominal * scale * rng.uniform(0.97, 1.03, nominal.shape)).T
    recovery = np.exp(-tr / t1)
    if inversion is None:
        longitudinal = 1.0 - recovery
    else:
        kind, (low, high) = inversion
        if kind == "ms":
            ti = rng.uniform(low, high)
        else:  # a fraction of the CSF null: 1 − 2 e^(−TI/T1) + e^(−TR/T1) = 0
            csf = TISSUES.index("csf")
            ti = rng.uniform(low, high) * t1[csf] * np.log(2.0 / (1.0 + recovery[csf]))
        longitudinal = np.abs(1.0 - 2.0 * np.exp(-ti / t1) + recovery)
    return rho * longitudinal * np.exp(-te / t2)


def synthesise(fractions: np.ndarray, weighting: str, rng: np.random.Generator) -> np.ndarray:
    """One contrast of ``weighting`` from ``fractions`` ``(..., 4, ny, nx)``: magnitude ``(..., ny, nx)`` float32,
    normalised like every image source (99.5th percentile of the anatomy 1)."""
    return normalise(np.tensordot(tissue_signals(weighting, rng), fractions, axes=(0, -3)))


def random_contrast(fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A contrast of a uniformly drawn weighting (:data:`WEIGHTINGS`) from ``fractions`` ``(4, ny, nx)``."""
    return synthesise(fractions, str(rng.choice(list(WEIGHTINGS))), rng)


def t2_weighted(t1_stack: np.ndarray) -> np.ndarray:
    """A T2-weighted contrast of a T1-weighted head stack ``(n, ny, nx)`` by a monotone-per-segment intensity
    remapping: the T1 intensities of CSF, grey and white matter (:func:`tissue_levels`) map to
    :data:`T2_LEVELS` (CSF bright, WM dark), linearly in between (partial volumes), background 0 → 0, and intensities
    above white matter (fat, marrow: bright on T1 and on fast-spin-echo T2) fall back to 0.5. Renormalised like
    every source (99.5th percentile 1). The anatomy is the T1 head's: this tests contrast, not a new person."""
    csf, gm, wm = tissue_levels(t1_stack)
    top = float(t1_stack.max())
    knots = [0.0, csf, gm, wm, max(top, wm * 1.01)]
    values = [0.0, T2_LEVELS[0], T2_LEVELS[1], T2_LEVELS[2], 0.5]
    return normalise(np.interp(t1_stack, knots, values).astype(np.float32))


def with_t2_weighted(stacks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``stacks`` (T1-weighted sources) and, for each, its :func:`t2_weighted` contrast as ``"{name}-t2w"``."""
    return {**stacks, **{f"{name}-t2w": t2_weighted(stack) for name, stack in stacks.items()}}
