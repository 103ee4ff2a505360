"""The multi-coil comparison, run under the protocol and written as the "Multi-coil scans" section of
docs/evaluation.md with its figure.

Regenerate the shipped section (replaces it in place, from its heading to the end of the file):

    python -m cdl_lambda.lab.evaluation.mc_report --doc docs/evaluation.md

``--plan`` picks the scale (:data:`PLANS`); ``--sizes`` runs part of it and ``--save``/``--load`` keep raw results
as JSON, so the sizes can run as separate processes and be rendered together.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cdl_lambda.lab import bart
from cdl_lambda.lab import images as lab_images
from cdl_lambda.lab.contrasts import t2_weighted
from cdl_lambda.lab.datasets import validation_images
from cdl_lambda.lab.evaluation import mc_methods as methods
from cdl_lambda.lab.evaluation import protocol
from cdl_lambda.lab.evaluation import scans as mc_scans
from cdl_lambda.lab.evaluation.protocol import Result, Tuning

log = logging.getLogger(__name__)

SECTION = "## Multi-coil scans as the scanner sends them"
DISPLAY = {"sense1": "zero-filled SENSE-1", "cg_sense": "CG-SENSE (Tikhonov)", "bart_l1": "BART pics ℓ1-wavelet",
           "bart_tv": "BART pics TV", "cdl_scalar": "CDL, scalar λ", "cdl_lambda_v3": "CDL-Λ V3",
           "cdl_lambda_v3_training": "CDL-Λ V3, training dictionaries (mean)",
           "cdl_lambda_v3_heldout": "CDL-Λ V3, held-out dictionaries (mean)",
           "unrolled": "unrolled network (black box)", "unet_ablation": "image-only U-Net (ablation)"}
TABLE_ORDER = tuple(DISPLAY)
CLASSICAL = ("cg_sense", "bart_l1", "bart_tv", "cdl_scalar")
SPLIT_TITLES = {"test": "Test anatomy, T1 (in distribution)", "t2": "Test anatomy, T2-weighted contrast",
                "ood": "Out of distribution"}
REGIONS = {"ssim_anatomy": "inside the anatomy",  # the two parts of the whole-image SSIM, apart
           "ssim_background": "outside the anatomy (the reference's background, within the field of view)"}


@dataclass
class Plan:
    """How much to run: slices per source of each split for each matrix size, and the settings per size."""

    name: str
    slices: dict[int, dict[str, int]]
    settings: dict[int, tuple[tuple[int, ...], tuple[float, ...]]]  # size -> (accelerations, SNRs)
    heldout_sizes: tuple[int, ...] = (128,)
    skip: dict[int, tuple[str, ...]] = field(default_factory=dict)  # size -> classical methods left out there

    def describe(self) -> str:
        parts = []
        for size, per_split in self.slices.items():
            accelerations, snrs = self.settings[size]
            parts.append(f"{size}²: R = {', '.join(map(str, accelerations))}, SNR {', '.join(f'{s:g}' for s in snrs)}"
                         f"; slices per source " + ", ".join(f"{k} {v}" for k, v in per_split.items())
                         + (f"; without {', '.join(DISPLAY[m] for m in self.skip[size])}" if self.skip.get(size)
                            else ""))
        return "; ".join(parts)


PLANS = {
    "full": Plan("full", {128: {"val": 3, "test": 4, "t2": 4, "ood": 2}, 256: {"val": 2, "test": 2, "t2": 2}},
                 {128: ((1, 2, 3, 4), (10, 20)), 256: ((1, 2, 3, 4), (10, 20))}),
    "reduced": Plan("reduced", {128: {"val": 2, "test": 1, "t2": 1, "ood": 1}, 256: {"val": 2, "test": 1}},
                    {128: ((1, 2, 3, 4), (10, 20)), 256: ((2,), (20,))}, skip={256: ("cdl_scalar",)}),
}


@dataclass
class Outcome:
    """What a run produced: results by method id, tunings by method and setting, R = 1 check lines, and the
    description of the data."""

    results: dict[str, Result] = field(default_factory=dict)
    tunings: dict[str, dict[tuple, Tuning]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def merge(self, other: "Outcome") -> None:
        for method_id, result in other.results.items():
            mine = self.results.setdefault(method_id, Result(method_id))
            mine.rows.update(result.rows)
            mine.seconds += result.seconds
            mine.count += result.count
        for method_id, per_setting in other.tunings.items():
            self.tunings.setdefault(method_id, {}).update(per_setting)
        self.checks += other.checks
        for key, value in other.notes.items():
            self.notes.setdefault(key, value if not isinstance(value, list) else [])
            if isinstance(value, list):
                self.notes[key] += value

    def to_json(self) -> dict:
        return {"results": {k: r.to_json() for k, r in self.results.items()},
                "tunings": {m: [[list(s), {"best": t.best, "numeric": t.grid.numeric, "extensions": t.extensions,
                                           "lower_bounds": t.grid.lower_bounds, "choices": t.grid.choices}]
                                for s, t in per.items()] for m, per in self.tunings.items()},
                "checks": self.checks, "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        tunings = {m: {tuple(s): Tuning(t["best"], methods.Grid(t["numeric"], t["lower_bounds"], t["choices"]),
                                        t["extensions"], []) for s, t in per}
                   for m, per in data["tunings"].items()}
        return cls({k: Result.from_json(v) for k, v in data["results"].items()}, tunings, data["checks"],
                   data["notes"])


# ---- images ---------------------------------------------------------------------------------------------------
def load_images(size: int) -> dict[str, dict[str, np.ndarray]]:
    """The splits at ``size``²: validation (the held-out person in T1 and T2-weighted), test (T1), the test head's
    T2-weighted contrast, out of distribution."""
    shape = (size, size)
    test = lab_images.load_split("test", shape)
    return {"val": validation_images(size), "test": test,
            "t2": {f"{name}-t2w": t2_weighted(stack) for name, stack in test.items()},
            "ood": lab_images.load_split("ood", shape)}


def slice_count(sources: dict[str, np.ndarray], per_source: int) -> int:
    """How many distinct slices :func:`lab.evaluation.scans.scans_of` takes from ``sources``."""
    return sum(min(per_source, len(stack)) for stack in sources.values())


def _average(parts: list[Result], method_id: str) -> Result:
    merged = Result(method_id, seconds=sum(p.seconds for p in parts), count=sum(p.count for p in parts))
    for part in parts:
        for key, rows in part.rows.items():
            merged.rows.setdefault(key, []).extend(rows)
    return merged


def run_size(size: int, plan: Plan, v3_model, train_dictionaries, heldout_dictionaries, default_dictionary,
             baselines: dict, with_bart: bool = True, images=None, only_accelerations=None,
             reference_dictionaries=()) -> tuple[Outcome, list]:
    """Tune on the validation split and evaluate every method on the test, T2 and OOD splits at ``size``² (only
    ``only_accelerations`` of the plan's when given). At the plan's held-out sizes the network also runs with every
    dictionary of ``heldout_dictionaries`` and of ``reference_dictionaries`` (training ones), each group averaged:
    the held-out-dictionary target compares the two means."""
    images = load_images(size) if images is None else images
    accelerations, snrs = plan.settings[size]
    accelerations = [r for r in accelerations if r in (only_accelerations or accelerations)]
    per_split = plan.slices[size]
    val = mc_scans.scans_of(images["val"], "val", per_split["val"], accelerations, snrs)
    tests = [scan for split in ("test", "t2", "ood") if per_split.get(split)
             for scan in mc_scans.scans_of(images[split], split, per_split[split], accelerations, snrs)]
    outcome = Outcome(notes={"sources": [[split, list(images[split])] for split in ("val", "test", "t2", "ood")
                                         if per_split.get(split)],
                             "counts": [[size, split, slice_count(images[split], per_split[split])]
                                        for split in ("val", "test", "t2", "ood") if per_split.get(split)]})
    classical = {m: method for m, method in methods.classical_methods(default_dictionary, with_bart).items()
                 if m not in plan.skip.get(size, ())}
    for method_id, method in classical.items():
        log.info("%d²: tuning %s on %d validation scans", size, method_id, len(val))
        outcome.tunings[method_id] = protocol.tune(method, val)
        outcome.checks += protocol.check_zero_filled(method, val, outcome.tunings[method_id])
    outcome.results["sense1"] = protocol.evaluate(methods.SENSE1, tests)
    for method_id, method in classical.items():
        log.info("%d²: evaluating %s", size, method_id)
        outcome.results[method_id] = protocol.evaluate(method, tests, outcome.tunings[method_id])
    groups = [("cdl_lambda_v3", train_dictionaries)]
    if size in plan.heldout_sizes:
        if reference_dictionaries:
            groups.append(("cdl_lambda_v3_training", list(reference_dictionaries)))
        groups.append(("cdl_lambda_v3_heldout", heldout_dictionaries))
    for method_id, dictionaries in groups:
        log.info("%d²: evaluating %s with %s", size, method_id, ", ".join(d.name for d in dictionaries))
        outcome.results[method_id] = _average(
            [protocol.evaluate(methods.Method(method_id, methods.network(v3_model, d)), tests) for d in dictionaries],
            method_id)
    for method_id, model in baselines.items():
        log.info("%d²: evaluating %s", size, method_id)
        outcome.results[method_id] = protocol.evaluate(methods.Method(method_id, methods.network(model, None)), tests)
    return outcome, tests


# ---- targets --------------------------------------------------------------------------------------------------
def _settings(outcome: Outcome, split: str) -> list[tuple]:
    return sorted({key[1:] for key in outcome.results["sense1"].rows if key[0] == split})


def check_targets(outcome: Outcome) -> list[str]:
    """The targets of the multi-coil comparison, each a line with its numbers, MET or MISSED."""
    results = outcome.results
    v3 = results.get("cdl_lambda_v3")
    if v3 is None:
        return []
    lines = []
    classical = [m for m in CLASSICAL if m in results]
    for split in ("test", "t2"):
        for setting in _settings(outcome, split):
            size, r, snr = setting
            ours = v3.mean(split, setting)
            where = f"{split} {size}² R={r} SNR {snr:g}"
            if r == 1:
                if "bart_tv" in results:
                    tv = results["bart_tv"].mean(split, setting)
                    lines.append(f"{where}: SSIM at least BART TV's: {ours['ssim']:.3f} vs {tv['ssim']:.3f} — "
                                 f"{'MET' if ours['ssim'] >= tv['ssim'] else 'MISSED'}")
                continue
            present = [m for m in classical if results[m].mean(split, setting)]
            if not present:
                continue
            best_s = max(present, key=lambda m: results[m].mean(split, setting)["ssim"])
            best_n = min(present, key=lambda m: results[m].mean(split, setting)["nrmse"])
            s, n = results[best_s].mean(split, setting)["ssim"], results[best_n].mean(split, setting)["nrmse"]
            lines.append(f"{where}: SSIM ≥ best classical + 0.02: {ours['ssim']:.3f} vs {s:.3f} ({DISPLAY[best_s]}) "
                         f"— {'MET' if ours['ssim'] >= s + 0.02 else 'MISSED'}")
            lines.append(f"{where}: NRMSE ≤ 0.8 × best classical: {ours['nrmse']:.3f} vs 0.8 × {n:.3f} = "
                         f"{0.8 * n:.3f} ({DISPLAY[best_n]}) — {'MET' if ours['nrmse'] <= 0.8 * n else 'MISSED'}")

    def drop(result: Result) -> float:
        settings = [s for s in _settings(outcome, "ood") if result.mean("test", s)]
        return float(np.mean([result.mean("test", s)["ssim"] - result.mean("ood", s)["ssim"] for s in settings]))

    others = [m for m in ("unrolled", "unet_ablation") if m in results]
    if others and _settings(outcome, "ood"):
        ours = drop(v3)
        ok = all(ours < drop(results[m]) for m in others)
        lines.append("test → OOD SSIM drop, test − OOD (mean over settings; negative: higher out of distribution): "
                     "CDL-Λ " + f"{ours:+.3f}" + "".join(
            f", {DISPLAY[m]} {drop(results[m]):+.3f}" for m in others) + f" — {'MET' if ok else 'MISSED'}")
    held = results.get("cdl_lambda_v3_heldout")
    if held is not None:
        trained = results.get("cdl_lambda_v3_training")
        reference, against = ((trained, "the training ones' mean") if trained is not None
                              else (v3, f"the {DISPLAY['cdl_lambda_v3']} row's"))
        settings = [s for s in _settings(outcome, "test") if held.mean("test", s) and reference.mean("test", s)]
        gap = float(np.mean([held.mean("test", s)["ssim"] - reference.mean("test", s)["ssim"] for s in settings]))
        lines.append(f"held-out dictionaries (mean) within 0.005 SSIM of {against} (test, mean over settings): "
                     f"{gap:+.4f} — {'MET' if gap >= -0.005 else 'MISSED'}")
    return lines


# ---- figure ---------------------------------------------------------------------------------------------------
FIGURE_METHODS = ("sense1", "bart_l1", "bart_tv", "cdl_scalar", "unrolled", "cdl_lambda_v3")


def figure_methods(model, default_dictionary, baselines: dict, with_bart: bool, tunings: dict) -> dict:
    """``{method id: run}`` of the figure's columns, in :data:`FIGURE_METHODS` order: those available (a classical
    method only once tuned, a learned baseline only when shipped)."""
    runs = {"sense1": methods.sense1_image, "cdl_lambda_v3": methods.network(model, default_dictionary)}
    runs.update({m: methods.network(net, None) for m, net in baselines.items()})
    classical = methods.classical_methods(default_dictionary, with_bart)
    runs.update({m: classical[m].run for m in FIGURE_METHODS if m in classical and m in tunings})
    return {m: runs[m] for m in FIGURE_METHODS if m in runs}


def figure_rows(tests: list, runs: dict, tunings: dict, picks=(("test", 2, 20), ("test", 4, 10), ("t2", 3, 10))):
    """One row per (split, R, SNR) of the first 128² scan: the reference, then each method (SSIM-best params)."""
    rows = []
    for split, r, snr in picks:
        scan = next((s for s in tests if s.split == split and s.setting == (128, r, snr)), None)
        if scan is None:
            continue
        panels = [scan.reference]
        for method_id, run in runs.items():
            params = tunings[method_id][scan.setting].best["ssim"] if method_id in tunings else None
            panels.append(np.abs(run(scan, params)))
        rows.append((f"{split} R={r} SNR={snr}", panels))
    return rows


def write_figure(path: Path, rows) -> None:
    """Rows of magnitude panels (reference first), each row scaled by its reference's maximum."""
    from cdl_lambda.lab.evaluation.report import tile, write_png
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, tile([[np.abs(p) / (float(np.abs(panels[0]).max()) or 1.0) for p in panels]
                          for _, panels in rows], gap=2, scale=2))


# ---- the section ----------------------------------------------------------------------------------------------
def _cell(values: dict) -> str:
    return f"{values['ssim']:.3f} / {values['nrmse']:.3f} / {values['psnr']:.1f}" if values else "–"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _header(settings) -> list[str]:
    return ["| method | " + " | ".join(f"{n}² R={r} SNR {s:g}" for n, r, s in settings) + " |",
            "|---|" + "---|" * len(settings)]


def render_section(outcome: Outcome, description: str, figure: str | None = None, caption: str = "") -> str:
    results = outcome.results
    lines = [SECTION, "", description, "",
             "Cells: SSIM / NRMSE / PSNR (dB) over the whole image, no intensity rescaling for any method; the "
             "classical methods' SSIM columns at their SSIM-best parameters and NRMSE/PSNR at their NRMSE-best ones "
             "(validation split, tables below).", ""]
    for split, title in SPLIT_TITLES.items():
        settings = _settings(outcome, split)
        if not settings:
            continue
        lines += [f"### {title}", ""] + _header(settings)
        lines += [f"| {DISPLAY[m]} | " + " | ".join(_cell(results[m].mean(split, s)) for s in settings) + " |"
                  for m in TABLE_ORDER if m in results and any(results[m].mean(split, s) for s in settings)]
        means = {m: [results[m].mean(split, s) for s in settings] for m in TABLE_ORDER if m in results}
        for key, where in REGIONS.items():
            lines += ["", f"SSIM {where} ({title}):", ""] + _header(settings)
            lines += [f"| {DISPLAY[m]} | " + " | ".join(f"{cell[key]:.3f}" if key in cell else "–" for cell in row)
                      + " |" for m, row in means.items() if any(row)]
        lines.append("")
    settings = sorted({s for per in outcome.tunings.values() for s in per})
    lines += ["### Tuned parameters", "", "Best on the validation split, SSIM-best / NRMSE-best; λ of BART relative "
              "to its automatically scaled data, CDL's λ in noise units; `maps`: BART's ecalib maps cropped "
              f"(`-c {bart.ECALIB_CROPS['cropped']:g}`) or uncropped (`-c 0`). A value marked ⁰ is the lower bound "
              "λ = 0 (the unregularised limit).", ""] + _header(settings)
    for method_id, per in outcome.tunings.items():
        cells = []
        for s in settings:
            t = per.get(s)
            if t is None:
                cells.append("–")
                continue
            marks = {m: "⁰" if t.at_lower_bound(m) else "" for m in protocol.METRICS}
            cells.append(" / ".join(_params(t.best[m]) + marks[m] for m in protocol.METRICS))
        lines.append(f"| {DISPLAY[method_id]} | " + " | ".join(cells) + " |")
    lines += ["", "Final grids (after any extension; ×n: the axis was extended n times): " + "; ".join(
        f"{DISPLAY[m]}: " + ", ".join(
            f"{axis} {{{', '.join(f'{v:.3g}' for v in values)}}}"
            + (f" ×{max(t.extensions[axis] for t in per.values())}"
               if max(t.extensions[axis] for t in per.values()) else "")
            for axis, values in next(iter(per.values())).grid.numeric.items())
        for m, per in outcome.tunings.items()) + " (the grid shown is the first setting's).", ""]
    lines += ["### Checks of the protocol", "", "The λ → 0 check at R = 1 (validation split: each tuned method at its "
              "best parameters against its own zero-filled image, same coil maps; tolerance 0.005 SSIM, 2 % NRMSE):",
              ""]
    lines += [f"- {line}" for line in outcome.checks] + [""]
    split = "test"
    scale = {m: np.mean([r["ls_scale"] for key, rows in res.rows.items() if key[0] == split for r in rows])
             for m, res in results.items()}
    lines += ["Least-squares intensity scale argmin_a ‖a|x̂| − ref‖ (recorded, not applied; test T1, mean over "
              "settings): " + ", ".join(f"{DISPLAY[m]} {scale[m]:.3f}" for m in TABLE_ORDER if m in scale) + ".", ""]
    seconds = {m: r.seconds / max(r.count, 1) for m, r in results.items()}
    lines += ["Seconds per slice on this (shared, loaded) machine, all sizes together: " + ", ".join(
        f"{DISPLAY[m]} {seconds[m]:.2f}" for m in TABLE_ORDER if m in seconds) + ".", ""]
    lines += ["### Targets", ""] + [f"- {line}" for line in check_targets(outcome)] + [""]
    if figure:
        lines += [f"![multi-coil reconstructions]({figure})", "", caption, ""]
    return "\n".join(lines)


def replace_section(document: str, section: str) -> str:
    """``document`` with everything from :data:`SECTION` to its end replaced by ``section``."""
    head = document.split(SECTION)[0].rstrip("\n")
    return head + "\n\n" + section.rstrip("\n") + "\n"


# ---- the command ----------------------------------------------------------------------------------------------
def load_models(weights_dir=None, network: str = "default", train_dictionaries: int = 0, heldout_dictionaries: int = 0,
                reference_dictionaries: int = 0):
    """The shipped V3 network (with the solver of its manifest entry, as deployed), ``train_dictionaries`` of its
    training dictionaries (evenly spread; 0: the shipped default dictionary alone, as the product runs), the first
    ``heldout_dictionaries`` held-out ones (0: all), the default dictionary, the learned baselines, and
    ``reference_dictionaries`` training dictionaries (evenly spread; 0: all) for the held-out comparison."""
    from cdl_lambda.lab.evaluation.methods import choose_dictionaries
    from cdl_lambda.recon.model import CDLLambda
    from cdl_lambda.recon.weights import WeightsRegistry
    registry = WeightsRegistry(weights_dir)
    v3 = registry.network(network)
    dicts = choose_dictionaries(registry, "default", max(train_dictionaries, 1), None)
    train = [registry.dictionary(n) for n in dicts.train] if train_dictionaries else [dicts.default]
    model = CDLLambda.deployed(v3).eval()
    held = dicts.held_out[:heldout_dictionaries] if heldout_dictionaries else dicts.held_out
    reference = choose_dictionaries(registry, "default", reference_dictionaries, None).train
    return (v3.name, model, train, [registry.dictionary(n) for n in held], dicts.default, learned_baselines(registry),
            [registry.dictionary(n) for n in reference])


def learned_baselines(registry) -> dict:
    """The shipped comparison networks by method id (image-only U-Net ablation, unrolled network), those present."""
    from cdl_lambda.lab.train import load_trained
    baselines = {}
    for kind, method_id in (("ablation", "unet_ablation"), ("unrolled", "unrolled")):
        entry = next((e for e in registry.baselines.values() if e.get("kind") == kind), None)
        if entry is not None:
            baselines[method_id] = load_trained(io.BytesIO(registry.read_verified(entry, kind)[0]))[0]
    return baselines


def describe(plan: Plan, outcome: Outcome, network: str, train, held, default, solver: str = "",
             reference=()) -> str:
    sources = {split: names for split, names in outcome.notes.get("sources", [])}
    counts = ", ".join(f"{split} {n} at {size}²" for size, split, n in outcome.notes.get("counts", []))
    return (f"{mc_scans.COILS} coils (birdcage, correlated channel noise, noise pre-scan, prewhitened), "
            f"{mc_scans.CALIBRATION_LINES} calibration lines, equispaced lines outside them. Scale of this run "
            f"(plan `{plan.name}`): {plan.describe()}. Distinct slices: {counts}. Sources: " + "; ".join(
                f"{split} {', '.join(names)}" for split, names in sources.items()) +
            f". The T2-weighted test contrast is the test head remapped (lab.contrasts.t2_weighted). "
            f"CDL-Λ: network {network} with its deployed solver ({solver}) and "
            + (f"the dictionary {train[0].name}" if len(train) == 1 else
               f"the training dictionaries {', '.join(d.name for d in train)} averaged")
            + f"; held out ({plan.heldout_sizes[0]}² only, averaged): {', '.join(d.name for d in held)}"
            + (f", compared with the training dictionaries {', '.join(d.name for d in reference)} averaged"
               if reference else "")
            + f"; CDL with a scalar λ uses {default.name}. Coil maps: the product's "
            "ESPIRiT (recon.coils) for every method but BART, which uses its own `ecalib` maps, cropped or "
            f"uncropped, whichever scores better; BART `pics` runs {bart.PICS_ITERATIONS} iterations (`-i`), `-S`.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", default="docs/evaluation.md", help="the report whose multi-coil section is replaced")
    parser.add_argument("--plan", choices=sorted(PLANS), default="reduced")
    parser.add_argument("--sizes", type=int, nargs="+", help="run only these matrix sizes of the plan")
    parser.add_argument("--accelerations", type=int, nargs="+", help="run only these R of the plan")
    parser.add_argument("--train-dictionaries", type=int, default=0,
                        help="CDL-Λ averaged over this many training dictionaries (0: the default dictionary)")
    parser.add_argument("--heldout-dictionaries", type=int, default=0,
                        help="held-out dictionaries to average (0: all, the unseen K among them)")
    parser.add_argument("--reference-dictionaries", type=int, default=0,
                        help="training dictionaries the held-out ones are compared with, averaged (0: all)")
    parser.add_argument("--save", help="write the raw outcome (JSON) here instead of the document")
    parser.add_argument("--load", nargs="+", help="render saved outcomes (JSON) instead of running")
    parser.add_argument("--no-bart", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights-dir")
    parser.add_argument("--note", default="", help="a sentence added to the section's description (how it was run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    plan = PLANS[args.plan]
    network, model, train, held, default, baselines, reference = load_models(
        args.weights_dir, "default", args.train_dictionaries, args.heldout_dictionaries, args.reference_dictionaries)
    outcome, tests = Outcome(), []
    start = time.time()
    if args.load:
        for path in args.load:
            outcome.merge(Outcome.from_json(json.loads(Path(path).read_text())))
    else:
        for size in args.sizes or list(plan.slices):
            part, scans = run_size(size, plan, model, train, held, default, baselines, with_bart=not args.no_bart,
                                   only_accelerations=args.accelerations, reference_dictionaries=reference)
            outcome.merge(part)
            tests += scans
        outcome.notes["minutes"] = [round((time.time() - start) / 60, 1)]
    if args.save:
        Path(args.save).write_text(json.dumps(outcome.to_json()))
        return 0
    doc = Path(args.doc)
    figure = "figures/evaluation-multicoil.png"
    if not tests:  # rendering saved outcomes: the figure's scans are simulated again (deterministic)
        images = load_images(128)
        outcome.notes["counts"] = [[size, split, slice_count(load_images(size)[split] if size != 128 else images[split],
                                                             n)]
                                   for size, per_split in plan.slices.items() for split, n in per_split.items()]
        tests = [s for split in ("test", "t2") for s in mc_scans.scans_of(images[split], split, 1, (2, 3, 4), (10, 20))]
    runs = figure_methods(model, default, baselines, not args.no_bart, outcome.tunings)
    rows = figure_rows(tests, runs, outcome.tunings)
    write_figure(doc.parent / figure, rows)
    caption = ("Rows: " + "; ".join(label for label, _ in rows) + " (128², one slice each). Columns: reference, "
               + ", ".join(DISPLAY[m] for m in runs) + f" (CDL-Λ with the default dictionary {default.name}); "
               "each row scaled by its reference's maximum; classical methods at their SSIM-best parameters.")
    solver = f"{model.solver.upper()}, cap {model.iterations}" + (f", tolerance {model.tolerance:g}" if model.tolerance
                                                                  else "")
    description = describe(plan, outcome, network, train, held, default, solver, reference) + (
        f" {args.note}" if args.note else "")
    section = render_section(outcome, description, figure, caption)
    doc.write_text(replace_section(doc.read_text(), section))
    log.info("wrote %s and %s", doc, doc.parent / figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
