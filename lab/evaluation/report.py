"""The evaluation report: Markdown tables of every method's metrics, the targets, and a PNG figure of
reconstructions (and the dictionary). The only place where method ids become display names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cdl_lambda.lab.evaluation.methods import Method

DISPLAY_NAMES = {
    "zero_filled": "zero-filled",
    "cdl_scalar": "CDL, scalar λ (best on validation)",
    "cdl_lambda_v3": "CDL-Λ V3, training dictionaries",
    "cdl_lambda_v3_heldout": "CDL-Λ V3, held-out dictionaries",
    "cdl_lambda_v3_unseen_k": "CDL-Λ V3, held-out {detail} only",
    "cdl_lambda_v3_default": "CDL-Λ V3",
    "cdl_lambda_v3_fixed": "CDL-Λ V3, fixed dictionary",
    "cdl_lambda_v3_permuted": "CDL-Λ V3, same dictionary permuted",
    "v1": "V1, training filter order",
    "v1_permuted": "V1, filters permuted",
    "unet_ablation": "ablation: U-Net image-to-image",
    "unrolled": "unrolled (MoDL-style black box)",
    "bart_pics": "BART pics -l1 -r 0.01",
}

SPLIT_TITLES = {"test": "In distribution (test: a real human T1 head not used in training)",
                "ood": "Out of distribution (macaque brain, EPI b0 contrast, knee)",
                "val": "Validation"}


def display_name(method: Method | str, detail: str = "") -> str:
    """The report's name of a method (or a method id)."""
    method_id, detail = (method.id, method.detail) if isinstance(method, Method) else (method, detail)
    return DISPLAY_NAMES.get(method_id, method_id).format(detail=detail)


# ---- figure ----------------------------------------------------------------------------------------------------
def write_png(path: Path, image: np.ndarray) -> None:
    """8-bit greyscale PNG from a float array in [0, 1] ``(rows, cols)``."""
    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


def tile(rows: list[list[np.ndarray]], gap: int = 2, scale: int = 2) -> np.ndarray:
    """Grid of equally sized panels (each in [0, 1]) with white gaps, up-sampled ``scale``× (nearest)."""
    n = rows[0][0].shape[0]
    cols = max(len(r) for r in rows)
    out = np.ones((len(rows) * (n + gap) - gap, cols * (n + gap) - gap))
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            out[i * (n + gap):i * (n + gap) + n, j * (n + gap):j * (n + gap) + n] = panel
    return np.kron(out, np.ones((scale, scale)))


def _pick(volumes, split: str, noise: float, source: str | None = None):
    chosen = [v for v in volumes if v.split == split and v.noise == noise]
    return next((v for v in chosen if v.source == source), chosen[0] if chosen else None)


def write_figure(path: Path, methods: list[Method], volumes, figure_ood: str | None = None,
                 maps_from: str = "cdl_lambda_v3_default", noise: float = 0.2):
    """Rows: the middle slice of an in-distribution and of an out-of-distribution volume at σ² = ``noise`` (those
    that exist), target then each method, magnitudes scaled by the target's maximum; then the first Λ maps of
    method ``maps_from`` on the first row's slice. Returns the volumes shown."""
    from cdl_lambda.lab.datasets import Batch

    picks = [v for v in (_pick(volumes, "test", noise), _pick(volumes, "ood", noise, figure_ood)) if v is not None]
    rows, lam_maps = [], None
    for volume in picks:
        i = volume.batch.target.shape[0] // 2
        one = Batch(*(t[i:i + 1] for t in (volume.batch.target, volume.batch.kspace, volume.batch.mask)))
        vmax = float(one.target.abs().max())
        row = [one.target.abs()[0].numpy() / vmax]
        for m in methods:
            image, maps = m.run(one)
            row.append(image.abs()[0].numpy() / vmax)
            if m.id == maps_from and lam_maps is None and maps is not None:
                lam_maps = maps[0].numpy()
        rows.append(row)
    if lam_maps is not None:
        rows.append([lam_maps[k] / max(float(lam_maps.max()), 1e-12) for k in range(min(len(rows[0]), len(lam_maps)))])
    write_png(path, tile(rows))
    return picks


def write_dictionary_figure(path: Path, filters: np.ndarray, per_row: int = 16) -> None:
    """The filters ``(K, k_f, k_f)`` as tiles, grey = 0, each scaled to its own maximum."""
    panels = [0.5 + 0.5 * f / max(float(np.abs(f).max()), 1e-12) for f in filters]
    write_png(path, tile([panels[i:i + per_row] for i in range(0, len(panels), per_row)], gap=1, scale=6))


# ---- Markdown --------------------------------------------------------------------------------------------------
def fmt(values: dict, key: str, digits: int = 3) -> str:
    return f"{values[key]:.{digits}f}" if values and key in values else "–"


def data_description(size: int, slices: int, volumes) -> str:
    return (f"{size}×{size} images from the packaged-image splits of lab.images, up to {slices} "
            "slices per source volume, single coil, central k-space window of half the matrix per axis, "
            "complex Gaussian noise of variance σ² × the variance of the measured k-space (lab.datasets). Test: "
            + ", ".join(sorted({v.source for v in volumes if v.split == 'test'})) + "; out of "
            "distribution: " + ", ".join(sorted({v.source for v in volumes if v.split == 'ood'})) + ".")


def trained_models(registry) -> list[dict]:
    """The manifest entries of the trained networks and baselines."""
    return list(registry.networks.values()) + list(registry.baselines.values())


def render_report(methods: list[Method], info: dict, figure: str | None, noise_levels) -> str:
    """The Markdown text. ``info``: command, data, settings, targets (lines), grid ((λ, β, SSIM) rows),
    figure_caption, trained (manifest entries); missing parts are left out."""
    lines = ["# Evaluation: CDL-Λ and baselines on the low-field task", "",
             "Generated by `" + info.get("command", "cdl-lambda-lab evaluate") + "`; every method sees identical data. "
             + info.get("data", ""), ""]
    if info.get("settings"):
        lines += [f"Reconstruction settings: {info['settings']}", ""]
    for split, title in SPLIT_TITLES.items():
        for noise in noise_levels:
            rows = [(m, m.summary(split, noise)) for m in methods]
            rows = [(m, v) for m, v in rows if v]
            if not rows:
                continue
            lines += [f"## {title}, σ² = {noise}", "",
                      "| method | SSIM (mask) | SSIM | PSNR dB | NMSE (mask) | blur effect | s / slice |",
                      "|---|---|---|---|---|---|---|"]
            for m, v in rows:
                lines.append(f"| {display_name(m)} | {fmt(v, 'ssim_mask')} | {fmt(v, 'ssim')} | {fmt(v, 'psnr', 2)} | "
                             f"{fmt(v, 'nmse_mask')} | {fmt(v, 'blur')} | {m.seconds / max(m.slices, 1):.3f} |")
            lines.append("")
    robust = [(m, noise, m.summary("test", noise), m.summary("ood", noise)) for m in methods for noise in noise_levels]
    robust = [row for row in robust if row[2] and row[3]]
    if robust:
        lines += ["## Robustness: brain-masked SSIM, in distribution → out of distribution", "",
                  "| method | σ² | in | out | drop |", "|---|---|---|---|---|"]
        lines += [f"| {display_name(m)} | {noise} | {a['ssim_mask']:.3f} | {b['ssim_mask']:.3f} | "
                  f"{a['ssim_mask'] - b['ssim_mask']:+.3f} |" for m, noise, a, b in robust]
        lines += ["", "The out-of-distribution images score higher than the in-distribution head for every method, "
                  "zero-filled included (smoother anatomy, more background), so a drop is negative; what matters is "
                  "how the methods' drops compare: a smaller (more negative) drop means the method kept more of its "
                  "quality "
                  "on the new data.", ""]
    if info.get("targets"):
        lines += ["## Targets", ""] + [f"- {t}" for t in info["targets"]] + [""]
    if info.get("grid"):
        lines += ["## Scalar-λ grid (validation split, σ² = 0.2, brain-masked SSIM)", "",
                  "| λ | β | SSIM |", "|---|---|---|"]
        lines += [f"| {lam:g} | {beta:g} | {s:.3f} |" for lam, beta, s in info["grid"]] + [""]
    if figure:
        lines += ["## Figure", "", f"![reconstructions]({figure})", "", info.get("figure_caption", ""), ""]
        if info.get("dictionary_figure"):
            lines += [f"![dictionary]({info['dictionary_figure']})", "",
                      "The default dictionary's filters (grey = 0, each filter scaled to its own maximum).", ""]
    if info.get("trained"):
        lines += ["## How the shipped models were trained", "",
                  "| model | method | steps × batch | CPU minutes (whole lineage) | lr | FISTA T / differentiated "
                  "| validation error / SSIM |", "|---|---|---|---|---|---|---|"]
        data = []
        for entry in info["trained"]:
            t, m = entry.get("training", {}), entry.get("metrics") or {}
            solver = (f"{t.get('iterations')} / {t.get('grad_iterations')}" if entry.get("version") else "–")
            ssim = m.get("val_ssim")
            minutes = t.get("cpu_minutes") if t.get("total_cpu_minutes") is None else (
                f"{t.get('cpu_minutes')} ({t.get('total_cpu_minutes')})")
            lines.append(f"| {entry['name']} | {t.get('method')} | {t.get('steps')} × {t.get('batch_size')} | "
                         f"{minutes} | {t.get('lr')} | {solver} | {m.get('val_relative_error2')} / "
                         f"{'–' if ssim is None else ssim} |")
            if t.get("data") and t["data"] not in data:
                data.append(t["data"])
        lines += ["", "Validation figures are the last of each run on its own validation set (relative squared error; "
                  "the runs on different data validate on different sets), so they compare only between runs on the "
                  "same training data.", "",
                  "Training data: " + "; ".join(f"({i + 1}) {d}" for i, d in enumerate(data)),
                  "", "Commands: see `weights/README.md` and the `note` of each manifest entry.", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, name: str, methods: list[Method], figure_methods: list[Method], volumes,
                 info: dict, figure_ood: str | None = None, dictionary=None) -> str:
    """Write ``out_dir/name.md``, ``out_dir/figures/name.png`` (and ``name-dictionary.png`` when ``dictionary`` is
    given); returns the Markdown text."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    figure = out_dir / "figures" / f"{name}.png"
    picks = write_figure(figure, figure_methods, volumes, figure_ood)
    info = dict(info)
    if dictionary is not None:
        write_dictionary_figure(out_dir / "figures" / f"{name}-dictionary.png", dictionary.filters.numpy())
        info["dictionary_figure"] = f"figures/{name}-dictionary.png"
    shown = " and ".join(f"{v.source} ({'in' if v.split == 'test' else 'out of'} distribution)" for v in picks)
    info.setdefault("figure_caption", (
        f"Rows: the middle slice of {shown} at σ² = 0.2, magnitudes scaled by the target's maximum"
        + (f"; then the first Λ maps (CDL-Λ V3, dictionary {dictionary.name}, first row's slice, common scale)"
           if dictionary is not None else "")
        + ". Columns: target, " + ", ".join(display_name(m) for m in figure_methods) + "."))
    noise_levels = sorted({v.noise for v in volumes})
    text = render_report(methods, info, f"figures/{figure.name}", noise_levels)
    (out_dir / f"{name}.md").write_text(text)
    return text
