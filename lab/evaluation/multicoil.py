"""The multi-coil evaluation: scans as a scanner sends them, reconstructed by CDL-Λ and the best classical methods.

Scans (:func:`simulate_scan`): a magnitude slice of the split (128² by default) becomes complex ground truth with a
smooth phase, seen by an 8-channel birdcage array whose channel noise is correlated (neighbour correlation 0.3,
gain spread), with a noise pre-scan; image SNR (mean object magnitude over the noise std of the fully sampled
SENSE-1 image) 10 or 20; Cartesian phase-encoding lines at R = 1, 2, 3 (equispaced outside 16 fully sampled
calibration lines). Every method gets the same data, prewhitened with the noise scan as the gadget does
(:func:`recon.preprocessing.whitening_matrix`), so the noise is white with σ = 1.

Reference: the true image combined with the true (whitened, normalised) maps, |x|·‖W c‖. Metrics on magnitudes
without any rescaling (every method returns the units of the data): SSIM, NRMSE = ‖|x̂| − ref‖ / ‖ref‖, PSNR, and
SSIM inside the anatomy (:func:`lab.metrics.foreground_mask`).

Methods (ids): ``sense1`` zero-filled SENSE-1 (Aᴴy with the ESPIRiT maps), ``cg_sense`` CG-SENSE with Tikhonov
(AᴴA + λI)x = Aᴴy, ``bart_l1`` and ``bart_tv`` BART ``pics`` with ℓ1-wavelets / total variation and BART's own
``ecalib`` maps, ``cdl_scalar`` CDL with one scalar λ, ``cdl_lambda_v3`` / ``cdl_lambda_v3_heldout`` CDL-Λ with
training / held-out dictionaries, ``unrolled`` and ``unet_ablation`` the learned baselines retrained on the same
kind of scans. Every classical parameter (λ, and β for CDL) is tuned per setting (R, SNR) on the validation split by
mean SSIM, then fixed for the test and out-of-distribution splits; the networks get no tuning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import torch

from cdl_lambda.lab import bart, metrics
from cdl_lambda.lab.physics import birdcage_maps, channel_covariance, complex_image, correlated_noise
from cdl_lambda.recon import coils as _coils
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.lowpass import conjugate_gradient
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.operators import MultiCoilOperator
from cdl_lambda.recon.pipeline import default_calibration_mask
from cdl_lambda.recon.preprocessing import whitening_matrix
from cdl_lambda.recon.sampling import equispaced_line_mask

log = logging.getLogger(__name__)

ACCELERATIONS = (1, 2, 3)
SNRS = (10, 20)
CALIBRATION_LINES = 16
COILS = 8


@dataclass
class Scan:
    """One prewhitened scan: ``kspace`` ``(coils, ny, nx)``, ``mask`` ``(ny, nx)``, ``reference`` ``(ny, nx)``."""

    kspace: torch.Tensor
    mask: torch.Tensor
    reference: np.ndarray
    split: str
    source: str
    acceleration: int
    snr: float
    maps: torch.Tensor | None = None  # ESPIRiT maps, estimated once per scan

    @property
    def setting(self) -> tuple[int, float]:
        return self.acceleration, self.snr


def simulate_scan(magnitude: np.ndarray, acceleration: int, snr: float, seed, split: str = "",
                  source: str = "") -> Scan:
    """The scan of one magnitude slice (module docstring), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    ny, nx = magnitude.shape
    x = complex_image(magnitude, rng)
    maps = birdcage_maps(COILS, (ny, nx), rotation=rng.uniform(0, 2 * np.pi))
    inside = magnitude > 0.1 * magnitude.max()
    sigma = float(np.abs(x)[inside].mean() / snr)
    covariance = channel_covariance(COILS, rng, 0.3) * sigma ** 2
    clean = _fft.fft2c(torch.from_numpy(maps * x)).numpy()
    noisy = clean + correlated_noise(rng, covariance, (ny, nx))
    noise_scan = correlated_noise(rng, covariance, (1024,))
    mask = (equispaced_line_mask((ny, nx), acceleration, CALIBRATION_LINES) if acceleration > 1
            else torch.ones(ny, nx))
    whitening = torch.from_numpy(whitening_matrix(noise_scan))
    kspace = _coils.prewhiten(torch.from_numpy((noisy * mask.numpy()).astype(np.complex64)), whitening, coil_dim=0)
    whitened_maps = _coils.prewhiten(torch.from_numpy(maps), whitening, coil_dim=0)
    reference = np.abs(x) * whitened_maps.abs().pow(2).sum(0).sqrt().numpy()
    return Scan(kspace, mask.float(), reference.astype(np.float32), split, source, acceleration, snr)


SPLIT_SEEDS = {"val": 0, "test": 1, "ood": 2}  # deterministic across processes (unlike hash() of a str)


def scans_of(images: dict[str, np.ndarray], split: str, per_source: int, seed: int = 0) -> list[Scan]:
    """Every setting for ``per_source`` evenly spread slices of each source of a split."""
    out = []
    for s_index, (source, stack) in enumerate(images.items()):
        picks = np.linspace(0, len(stack) - 1, min(per_source, len(stack))).round().astype(int)
        for i, pick in enumerate(picks):
            for a_index, (acceleration, snr) in enumerate(product(ACCELERATIONS, SNRS)):
                out.append(simulate_scan(stack[pick], acceleration, snr, seed=[seed, SPLIT_SEEDS[split], s_index,
                                                                               i, a_index],
                                         split=split, source=source))
    return out


def espirit_maps(scan: Scan) -> torch.Tensor:
    if scan.maps is None:
        scan.maps = _coils.estimate_coil_maps(scan.kspace, default_calibration_mask(scan.mask), noise_std=1.0)
    return scan.maps


# ---------------------------------------------------------------------------------------------------- methods
def sense1(scan: Scan, _=None) -> np.ndarray:
    return MultiCoilOperator(scan.mask, espirit_maps(scan)).adjoint(scan.kspace).numpy()


def cg_sense(scan: Scan, lam: float, iterations: int = 30) -> np.ndarray:
    op = MultiCoilOperator(scan.mask, espirit_maps(scan))
    x0 = op.adjoint(scan.kspace)
    return conjugate_gradient(lambda v: op.normal(v) + lam * v, x0[None], x0[None], iterations)[0].numpy()


def bart_l1(scan: Scan, lam: float) -> np.ndarray:
    return bart.pics_multicoil(scan.kspace.numpy(), ("-l1", "-r", str(lam)))


def bart_tv(scan: Scan, lam: float) -> np.ndarray:
    return bart.pics_multicoil(scan.kspace.numpy(), ("-R", f"T:3:0:{lam}"))


def cdl_model(model, dictionary, iterations: int = 64):
    """A method running a CDL-Λ-like ``model`` (also the learned baselines) with ``dictionary``."""
    def run(scan: Scan, _=None) -> np.ndarray:
        with torch.no_grad():
            out = model(scan.kspace[None], scan.mask, dictionary, coil_maps=espirit_maps(scan)[None], noise_std=1.0,
                        **({"iterations": iterations} if hasattr(model, "lambda_net") else {}))
        return out.image[0].numpy()
    return run


def cdl_scalar(dictionary, iterations: int = 64):
    def run(scan: Scan, params) -> np.ndarray:
        lam, beta = params
        return cdl_model(CDLLambda(None, beta=beta, scalar_lambda=lam, iterations=iterations), dictionary)(scan)
    return run


GRIDS = {
    "cg_sense": [0.01, 0.03, 0.1, 0.3, 1.0],
    "bart_l1": [0.001, 0.003, 0.01, 0.03, 0.1],
    "bart_tv": [0.003, 0.01, 0.03, 0.1, 0.3],
    "cdl_scalar": [(lam, beta) for lam in (0.5, 1.0, 2.0, 3.0) for beta in (1.0, 3.0)],
}


# ------------------------------------------------------------------------------------------------- scoring
def score(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    magnitude = np.abs(image)
    inside = metrics.foreground_mask(reference)[0]
    return {"ssim": metrics.ssim(reference, magnitude), "ssim_anatomy": metrics.ssim(reference, magnitude, inside),
            "nrmse": float(np.linalg.norm(magnitude - reference) / np.linalg.norm(reference)),
            "psnr": metrics.psnr(reference, magnitude)}


@dataclass
class Result:
    """Per (split, R, SNR): the mean of each metric, and the parameter used."""

    method: str
    rows: dict = field(default_factory=dict)      # (split, R, snr) -> list of metric dicts
    params: dict = field(default_factory=dict)    # (R, snr) -> parameter
    seconds: float = 0.0
    count: int = 0

    def mean(self, split: str, setting: tuple) -> dict[str, float]:
        rows = self.rows.get((split, *setting), [])
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def tune(run, grid, scans: list[Scan]) -> dict:
    """The grid value with the best mean SSIM on ``scans``, per setting."""
    best = {}
    for setting in sorted({s.setting for s in scans}):
        group = [s for s in scans if s.setting == setting]
        values = [np.mean([score(run(s, p), s.reference)["ssim"] for s in group]) for p in grid]
        best[setting] = grid[int(np.argmax(values))]
        log.info("tuned %s at R=%d SNR=%g: %s (SSIM %s)", getattr(run, "__name__", "method"), *setting,
                 best[setting], np.round(values, 4).tolist())
    return best


def evaluate(method_id: str, run, scans: list[Scan], params: dict | None = None) -> Result:
    result = Result(method_id, params=dict(params or {}))
    for scan in scans:
        parameter = (params or {}).get(scan.setting)
        start = time.perf_counter()
        image = run(scan, parameter)
        result.seconds += time.perf_counter() - start
        result.count += 1
        result.rows.setdefault((scan.split, *scan.setting), []).append(score(image, scan.reference))
    return result


# --------------------------------------------------------------------------------------------- run and report
DISPLAY = {"sense1": "zero-filled SENSE-1", "cg_sense": "CG-SENSE (Tikhonov)", "bart_l1": "BART pics ℓ1-wavelet",
           "bart_tv": "BART pics TV", "cdl_scalar": "CDL, scalar λ", "cdl_lambda_v3": "CDL-Λ V3",
           "cdl_lambda_v3_heldout": "CDL-Λ V3, held-out dictionaries", "unrolled": "unrolled network (black box)",
           "unet_ablation": "image-only U-Net (ablation)"}
TABLE_ORDER = ("sense1", "cg_sense", "bart_l1", "bart_tv", "cdl_scalar", "cdl_lambda_v3", "cdl_lambda_v3_heldout",
               "unrolled", "unet_ablation")


def _average(parts: list[Result], method_id: str) -> Result:
    """One result averaging several (the V3 network with each of several dictionaries)."""
    merged = Result(method_id, seconds=sum(p.seconds for p in parts), count=sum(p.count for p in parts))
    for part in parts:
        for key, rows in part.rows.items():
            merged.rows.setdefault(key, []).extend(rows)
    return merged


def run(images: dict[str, dict[str, np.ndarray]], v3_model, train_dictionaries, heldout_dictionaries,
        default_dictionary, baselines: dict, per_source: dict[str, int], with_bart: bool = True,
        progress=None) -> tuple[dict[str, Result], dict, list[Scan]]:
    """Tune the classical methods on ``images['val']``, then evaluate every method on the test and OOD splits.
    Returns the results by method id, the tuned parameters, and the test/OOD scans (for the figure)."""
    val = scans_of(images["val"], "val", per_source["val"])
    tests = scans_of(images["test"], "test", per_source["test"]) + scans_of(images["ood"], "ood", per_source["ood"])
    classical = {"cg_sense": cg_sense, "cdl_scalar": cdl_scalar(default_dictionary)}
    if with_bart and bart.available():
        classical.update(bart_l1=bart_l1, bart_tv=bart_tv)
    tuned = {}
    for method_id, method in classical.items():
        log.info("tuning %s on %d validation scans", method_id, len(val))
        tuned[method_id] = tune(method, GRIDS[method_id], val)
    results = {"sense1": evaluate("sense1", sense1, tests)}
    for method_id, method in classical.items():
        log.info("evaluating %s", method_id)
        results[method_id] = evaluate(method_id, method, tests, tuned[method_id])
    for method_id, dictionaries in (("cdl_lambda_v3", train_dictionaries),
                                    ("cdl_lambda_v3_heldout", heldout_dictionaries)):
        log.info("evaluating %s with %s", method_id, ", ".join(d.name for d in dictionaries))
        results[method_id] = _average([evaluate(method_id, cdl_model(v3_model, d), tests) for d in dictionaries],
                                      method_id)
    for method_id, model in baselines.items():
        log.info("evaluating %s", method_id)
        results[method_id] = evaluate(method_id, cdl_model(model, None), tests)
    return results, tuned, tests


def _cell(values: dict) -> str:
    return f"{values['ssim']:.3f} / {values['nrmse']:.3f} / {values['psnr']:.1f}" if values else "–"


def check_targets(results: dict[str, Result]) -> list[str]:
    """The issue's targets for the multi-coil setting, each a line with its numbers (MET or MISSED)."""
    lines = []
    settings = sorted({key[1:] for key in results["sense1"].rows if key[0] == "test"})
    v3 = results.get("cdl_lambda_v3")
    if v3 is None:
        return lines
    bart_ids = [m for m in ("bart_l1", "bart_tv") if m in results]
    for setting in settings:
        ours = v3.mean("test", setting)
        if bart_ids:
            best = max(bart_ids, key=lambda m: results[m].mean("test", setting)["ssim"])
            theirs = results[best].mean("test", setting)
            ok = ours["ssim"] >= theirs["ssim"] + 0.02 and ours["nrmse"] < theirs["nrmse"]
            lines.append(f"R={setting[0]} SNR={setting[1]:g}: CDL-Λ vs best tuned BART ({DISPLAY[best]}): SSIM "
                         f"{ours['ssim']:.3f} vs {theirs['ssim']:.3f} (target +0.02), NRMSE {ours['nrmse']:.3f} vs "
                         f"{theirs['nrmse']:.3f} — {'MET' if ok else 'MISSED'}")
        zf = results["sense1"].mean("test", setting)
        lines.append(f"R={setting[0]} SNR={setting[1]:g}: NRMSE not above zero-filled SENSE-1: {ours['nrmse']:.3f} vs "
                     f"{zf['nrmse']:.3f} — {'MET' if ours['nrmse'] <= zf['nrmse'] else 'MISSED'}")
        scalar = results["cdl_scalar"].mean("test", setting)
        ok = ours["ssim"] > scalar["ssim"] and ours["ssim_anatomy"] > scalar["ssim_anatomy"]
        lines.append(f"R={setting[0]} SNR={setting[1]:g}: above the tuned scalar λ (whole image / anatomy): "
                     f"{ours['ssim']:.3f} vs {scalar['ssim']:.3f} / {ours['ssim_anatomy']:.3f} vs "
                     f"{scalar['ssim_anatomy']:.3f} — {'MET' if ok else 'MISSED'}")

    def drop(result: Result) -> float:
        test = np.mean([result.mean("test", s)["ssim"] for s in settings])
        ood = np.mean([result.mean("ood", s)["ssim"] for s in settings if result.mean("ood", s)])
        return float(test - ood)

    others = [m for m in ("unrolled", "unet_ablation") if m in results]
    if others and any(results["sense1"].mean("ood", s) for s in settings):
        ours = drop(v3)
        ok = all(ours < drop(results[m]) for m in others)
        lines.append("test → OOD SSIM drop: CDL-Λ " + f"{ours:+.3f}" + "".join(
            f", {DISPLAY[m]} {drop(results[m]):+.3f}" for m in others) + f" — {'MET' if ok else 'MISSED'}")
    return lines


def write_figure(path, results_images: list[tuple[str, list[np.ndarray]]]) -> None:
    """Rows of magnitude panels (reference first), each row scaled by its reference's maximum."""
    from cdl_lambda.lab.evaluation.report import tile, write_png
    rows = []
    for _, panels in results_images:
        top = float(np.abs(panels[0]).max()) or 1.0
        rows.append([np.abs(p) / top for p in panels])
    write_png(path, tile(rows, gap=2, scale=2))


def figure_rows(tests: list[Scan], methods: dict[str, callable], tuned: dict,
                settings=((2, 20), (3, 10))) -> list[tuple[str, list[np.ndarray]]]:
    rows = []
    for setting in settings:
        scan = next((s for s in tests if s.split == "test" and s.setting == setting), None)
        if scan is None:
            continue
        panels = [scan.reference] + [np.abs(run(scan, tuned.get(m, {}).get(setting))) for m, run in methods.items()]
        rows.append((f"R={setting[0]} SNR={setting[1]}", panels))
    return rows


def render_section(results: dict[str, Result], tuned: dict, figure: str | None, caption: str,
                   description: str) -> str:
    settings = sorted({key[1:] for key in results["sense1"].rows})
    lines = ["## Multi-coil scans as the scanner sends them", "", description, "",
             "Cells: SSIM / NRMSE / PSNR (dB) over the whole image; each setting's classical parameters tuned on the "
             "validation split (table below).", ""]
    for split, title in (("test", "Test anatomy (in distribution)"), ("ood", "Out of distribution")):
        if not any(results["sense1"].mean(split, s) for s in settings):
            continue
        lines += [f"### {title}", "", "| method | " + " | ".join(f"R={r}, SNR {s:g}" for r, s in settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for method_id in TABLE_ORDER:
            if method_id in results:
                lines.append(f"| {DISPLAY[method_id]} | " + " | ".join(
                    _cell(results[method_id].mean(split, s)) for s in settings) + " |")
        lines.append("")
        lines += [f"SSIM inside the anatomy ({title.lower()}):", "",
                  "| method | " + " | ".join(f"R={r}, SNR {s:g}" for r, s in settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for method_id in TABLE_ORDER:
            if method_id in results:
                lines.append(f"| {DISPLAY[method_id]} | " + " | ".join(
                    f"{results[method_id].mean(split, s).get('ssim_anatomy', float('nan')):.3f}"
                    for s in settings) + " |")
        lines.append("")
    lines += ["Tuned parameters (validation split, best mean SSIM):", "", "| method | " +
              " | ".join(f"R={r}, SNR {s:g}" for r, s in settings) + " |", "|---|" + "---|" * len(settings)]
    for method_id, params in tuned.items():
        lines.append(f"| {DISPLAY[method_id]} | " + " | ".join(
            ("λ={:g}, β={:g}".format(*params[s]) if isinstance(params.get(s), tuple) else f"λ={params.get(s)}")
            for s in settings) + " |")
    seconds = {m: r.seconds / max(r.count, 1) for m, r in results.items()}
    lines += ["", "Seconds per slice on this machine: " + ", ".join(
        f"{DISPLAY[m]} {seconds[m]:.2f}" for m in TABLE_ORDER if m in seconds) + ".", ""]
    lines += ["### Targets", ""] + [f"- {line}" for line in check_targets(results)] + [""]
    if figure:
        lines += [f"![multi-coil reconstructions]({figure})", "", caption, ""]
    return "\n".join(lines)
