"""Evaluation of CDL-Λ against its baselines on identical data; writes a Markdown report and a PNG figure.

Data (:mod:`lab.experiment_data`): single-coil, centred k-space window n/2 × n/2 of n × n images (×2
super-resolution per axis), complex noise of variance σ² × the measured k-space variance, σ² ∈ {0.2, 0.3}, fixed seeds. Sets:
``test`` (in distribution: a human T1 head, :data:`lab.images.SPLITS`) and ``ood`` (macaque brain, EPI contrast,
knee). The scalar λ (and β) of the classical CDL baseline are grid-searched on the ``val`` split at σ² = 0.2.

Methods: zero-filled; CDL with one scalar λ; CDL-Λ V3 with training dictionaries, with held-out dictionaries (and
the held-out K alone), with a permuted dictionary; V1 with its training filter order and permuted; the image-only
U-Net ablation; the unrolled black-box network; BART ``pics -l1 -r 0.01`` when ``bart`` is installed.
Metrics (:mod:`lab.metrics`) on magnitudes, per volume (data range = the volume's maximum), averaged over volumes
weighted by their slices: SSIM and NMSE inside the anatomy mask and SSIM/PSNR on the whole image, blur effect.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lab import bart
from lab import experiment_data as data
from recon import fft as _fft
from lab import metrics as M
from recon.dictionary import Dictionary
from recon.model import CDLLambda
from lab.train import load_trained
from recon.weights import WeightsRegistry

log = logging.getLogger(__name__)

NOISE_LEVELS = (0.2, 0.3)


@dataclass
class Volume:
    split: str
    source: str
    noise: float
    batch: data.Batch
    mask: np.ndarray  # anatomy mask (slices, n, n)


@dataclass
class Method:
    name: str
    run: callable                   # Batch → (image complex (B, n, n), Λ maps (B, K, n, n) or None)
    group: str = ""
    seconds: float = 0.0
    slices: int = 0
    results: dict = field(default_factory=dict)  # (split, noise) → list of (slices, metrics dict)


# ---- data ------------------------------------------------------------------------------------------------------
def build_volumes(size: int, per_source: int, splits=("test", "ood"), noise_levels=NOISE_LEVELS) -> list[Volume]:
    volumes = []
    for split in splits:
        for source, stack in data.load_images(split, size).items():
            images = data.pick_slices(stack, per_source)
            for noise in noise_levels:
                seed = 1000 + int(noise * 100) + 7 * len(volumes)
                batch = data.fixed_examples(images, noise, seed=seed)
                volumes.append(Volume(split, source, noise, batch, M.foreground_mask(batch.target)))
    return volumes


# ---- methods ---------------------------------------------------------------------------------------------------
def _chunked(fn, batch: data.Batch, chunk: int = 4):
    images, lambdas = [], []
    for start in range(0, batch.kspace.shape[0], chunk):
        part = data.Batch(*(t[start:start + chunk] for t in (batch.target, batch.kspace, batch.mask)))
        image, lam = fn(part)
        images.append(image)
        lambdas.append(lam)
    return torch.cat(images), (torch.cat(lambdas) if lambdas[0] is not None else None)


def model_method(model, dictionary: Dictionary | None, iterations: int | None = None):
    @torch.no_grad()
    def run(batch: data.Batch):
        kwargs = {"iterations": iterations} if iterations else {}
        out = model(batch.kspace, batch.mask, dictionary, **kwargs)
        lam = out.lambda_maps if out.lambda_maps.shape[1] else None
        return out.image, lam
    return run


def zero_filled(batch: data.Batch):
    return _fft.ifft2c(batch.kspace), None


def bart_method(regularization: float = 0.01):
    def run(batch: data.Batch):
        return torch.from_numpy(bart.pics(batch.kspace.numpy(), regularization)), None
    return run


def evaluate_method(method: Method, volumes: list[Volume]) -> None:
    for volume in volumes:
        start = time.time()
        image, _ = _chunked(method.run, volume.batch)
        method.seconds += time.time() - start
        method.slices += image.shape[0]
        target = volume.batch.target
        values = {"ssim_mask": M.ssim(target, image, volume.mask), "ssim": M.ssim(target, image),
                  "psnr": M.psnr(target, image), "nmse_mask": M.nmse(target, image, volume.mask),
                  "blur": M.blur_effect(image, volume.mask)}
        method.results.setdefault((volume.split, volume.noise), []).append((image.shape[0], values))


def summary(method: Method, split: str, noise: float) -> dict[str, float]:
    rows = method.results.get((split, noise), [])
    total = sum(n for n, _ in rows)
    return {key: sum(n * v[key] for n, v in rows) / total for key in rows[0][1]} if rows else {}


def merge(name: str, parts: list[Method], group: str) -> Method:
    """Average several methods' results (e.g. one CDL-Λ network over several dictionaries)."""
    merged = Method(name, run=None, group=group)
    for part in parts:
        merged.seconds += part.seconds
        merged.slices += part.slices
        for key, rows in part.results.items():
            merged.results.setdefault(key, []).extend(rows)
    return merged


def grid_search_scalar(dictionary: Dictionary, size: int, iterations: int, lambdas, betas) -> tuple[float, float, list]:
    """Best (λ, β) of the scalar-λ CDL by brain-masked SSIM on the validation split at σ² = 0.2."""
    volumes = build_volumes(size, 6, splits=("val",), noise_levels=(0.2,))
    table = []
    for beta in betas:
        for lam in lambdas:
            method = Method("scalar", model_method(CDLLambda(None, beta=beta, iterations=iterations,
                                                             scalar_lambda=lam).eval(), dictionary))
            evaluate_method(method, volumes)
            table.append((lam, beta, summary(method, "val", 0.2)["ssim_mask"]))
    lam, beta, _ = max(table, key=lambda row: row[2])
    return lam, beta, table


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


# ---- report ----------------------------------------------------------------------------------------------------
def fmt(values: dict, key: str, digits: int = 3) -> str:
    return f"{values[key]:.{digits}f}" if values and key in values else "–"


def render_report(methods: list[Method], info: dict, figure: str) -> str:
    lines = ["# Evaluation: CDL-Λ and baselines on the low-field task", "",
             "Generated by `" + info["command"] + "`; every method sees identical data. " + info["data"], "",
             f"Reconstruction settings: {info['settings']}", ""]
    for split, title in (("test", "In distribution (test: a real human T1 head not used in training)"),
                         ("ood", "Out of distribution (macaque brain, EPI b0 contrast, knee)")):
        for noise in NOISE_LEVELS:
            lines += [f"## {title}, σ² = {noise}", "",
                      "| method | SSIM (mask) | SSIM | PSNR dB | NMSE (mask) | blur effect | s / slice |",
                      "|---|---|---|---|---|---|---|"]
            for m in methods:
                v = summary(m, split, noise)
                if v:
                    lines.append(f"| {m.name} | {fmt(v, 'ssim_mask')} | {fmt(v, 'ssim')} | {fmt(v, 'psnr', 2)} | "
                                 f"{fmt(v, 'nmse_mask')} | {fmt(v, 'blur')} | "
                                 f"{m.seconds / max(m.slices, 1):.3f} |")
            lines.append("")
    lines += ["## Robustness: brain-masked SSIM, in distribution → out of distribution", "",
              "| method | σ² | in | out | drop |", "|---|---|---|---|---|"]
    for m in methods:
        for noise in NOISE_LEVELS:
            a, b = summary(m, "test", noise), summary(m, "ood", noise)
            if a and b:
                lines.append(f"| {m.name} | {noise} | {a['ssim_mask']:.3f} | {b['ssim_mask']:.3f} | "
                             f"{a['ssim_mask'] - b['ssim_mask']:+.3f} |")
    lines += ["", "The out-of-distribution images score higher than the in-distribution head for every method, zero-filled "
              "included (smoother anatomy, more background), so a drop is negative; what matters is how the methods' "
              "drops compare: a smaller (more negative) drop means the method kept more of its quality on the new data."]
    lines += ["", "## Targets", ""] + [f"- {t}" for t in info["targets"]]
    lines += ["", "## Scalar-λ grid (validation split, σ² = 0.2, brain-masked SSIM)", "",
              "| λ | β | SSIM |", "|---|---|---|"]
    lines += [f"| {lam:g} | {beta:g} | {s:.3f} |" for lam, beta, s in info["grid"]]
    lines += ["", "## Figure", "", f"![reconstructions]({figure})", "", info["figure_caption"], "",
              f"![dictionary]({figure.replace('.png', '-dictionary.png')})", "",
              "The default dictionary's filters (grey = 0, each filter scaled to its own maximum).", ""]
    lines += ["## How the shipped models were trained", "",
              "| model | method | steps × batch | CPU minutes | lr | T / differentiated | final val MSE |",
              "|---|---|---|---|---|---|---|"]
    for entry in info["trained"]:
        t = entry.get("training", {})
        lines.append(f"| {entry['name']} | {t.get('method')} | {t.get('steps')} × {t.get('batch_size')} | "
                     f"{t.get('cpu_minutes')} | {t.get('lr')} | {t.get('iterations')} / {t.get('grad_iterations')} | "
                     f"{(entry.get('metrics') or {}).get('val_mse_sigma2_0.2')} |")
    lines += ["", "Training data: " + (info["trained"][0]["training"].get("data", "") if info["trained"] else ""),
              "", "Commands: see `weights/README.md` and the `note` of each manifest entry.", ""]
    return "\n".join(lines)


def check_targets(by_name: dict[str, Method]) -> list[str]:
    """The report's targets, each stated with the measured numbers and MET / MISSED."""
    def s(name, split="test", noise=0.2, key="ssim_mask"):
        v = summary(by_name[name], split, noise) if name in by_name else {}
        return v.get(key, float("nan"))

    out = []
    v3, zf, sc = "CDL-Λ V3, training dictionaries", "zero-filled", "CDL, scalar λ (best on validation)"
    for noise in NOISE_LEVELS:
        gain = s(v3, noise=noise) - s(zf, noise=noise)
        whole = s(v3, noise=noise, key="ssim") - s(zf, noise=noise, key="ssim")
        out.append(f"{'MET' if gain >= 0.2 else 'MISSED'}: CDL-Λ ≥ zero-filled + 0.2 SSIM in distribution, σ²={noise}"
                   f" (gain {gain:+.3f} brain-masked; {whole:+.3f} on the whole image)")
        diff = s(v3, noise=noise) - s(sc, noise=noise)
        whole = s(v3, noise=noise, key="ssim") - s(sc, noise=noise, key="ssim")
        out.append(f"{'MET' if diff > 0 else 'MISSED'}: CDL-Λ above the best scalar λ, σ²={noise} ({diff:+.3f} "
                   f"brain-masked; {whole:+.3f} on the whole image)")
    for other in ("unrolled (MoDL-style black box)", "ablation: U-Net image-to-image"):
        for noise in NOISE_LEVELS:
            d_v3 = s(v3, noise=noise) - s(v3, "ood", noise)
            d_o = s(other, noise=noise) - s(other, "ood", noise)
            out.append(f"{'MET' if d_v3 < d_o else 'MISSED'}: in→out SSIM drop of CDL-Λ ({d_v3:+.3f}) smaller than "
                       f"{other} ({d_o:+.3f}), σ²={noise}")
    unseen = [n for n in by_name if n.startswith("CDL-Λ V3, held-out K=")]
    for name in ["CDL-Λ V3, held-out dictionaries"] + unseen:
        for split in ("test", "ood"):
            diff = s(name, split) - s(v3, split)
            out.append(f"{'MET' if diff >= -0.02 else 'MISSED'}: {name} no more than 0.02 SSIM below the "
                       f"training dictionaries ({split}, σ²=0.2: {diff:+.3f})")
    v1 = s("V1, training filter order") - s("V1, filters permuted")
    v3p = s("CDL-Λ V3, fixed dictionary") - s("CDL-Λ V3, same dictionary permuted")
    out.append(f"{'MET' if v1 > 0.005 else 'MISSED'}: V1 loses under permutation (−{v1:.3f} SSIM)")
    out.append(f"{'MET' if abs(v3p) < 1e-3 else 'MISSED'}: V3 does not ({-v3p:+.4f} SSIM)")
    return out


def run_evaluation(args) -> int:
    torch.set_num_threads(args.threads)
    registry = WeightsRegistry(args.weights_dir)
    out_dir = Path(args.output_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    size, T = args.size, args.iterations

    default_dict = registry.dictionary(args.dictionary)
    train_names = sorted(n for n, e in registry.dictionaries.items() if e.get("split") == "train")
    held_names = sorted(n for n, e in registry.dictionaries.items() if e.get("split") != "train")
    train_k = {registry.dictionaries[n]["K"] for n in train_names}
    unseen = [n for n in held_names if registry.dictionaries[n]["K"] not in train_k]
    count = args.train_dictionaries or len(train_names)
    train_subset = train_names[::max(1, len(train_names) // count)][:count]

    log.info("grid search of the scalar λ on the validation split")
    lam, beta, grid = grid_search_scalar(default_dict, size, T, args.lambdas, args.betas)
    volumes = build_volumes(size, args.slices)
    log.info("%d volumes, %d slices", len(volumes), sum(v.batch.target.shape[0] for v in volumes))

    methods: list[Method] = [Method("zero-filled", zero_filled)]
    methods.append(Method("CDL, scalar λ (best on validation)",
                          model_method(CDLLambda(None, beta=beta, iterations=T, scalar_lambda=lam).eval(),
                                       default_dict)))
    v3 = registry.network(args.network)
    v3_model = CDLLambda(v3.network, beta=v3.beta, iterations=T).eval()
    parts = {name: Method(name, model_method(v3_model, registry.dictionary(name)))
             for name in dict.fromkeys(train_subset + held_names)}
    for part in parts.values():
        log.info("V3 with %s", part.name)
        evaluate_method(part, volumes)
    methods.append(merge("CDL-Λ V3, training dictionaries", [parts[n] for n in train_subset], "v3"))
    methods.append(merge("CDL-Λ V3, held-out dictionaries", [parts[n] for n in held_names], "v3"))
    if unseen:
        k = registry.dictionaries[unseen[0]]["K"]
        methods.append(merge(f"CDL-Λ V3, held-out K={k} only", [parts[n] for n in unseen], "v3"))

    v1_entry = next((e for e in registry.networks.values() if e.get("version") == "v1"), None)
    v1_dictionary = args.v1_dictionary or (v1_entry or {}).get("training", {}).get("dictionaries")
    perm_dict = registry.dictionary(v1_dictionary) if v1_dictionary else default_dict
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(perm_dict.num_filters, generator=generator)
    methods.append(Method("CDL-Λ V3, fixed dictionary", model_method(v3_model, perm_dict)))
    methods.append(Method("CDL-Λ V3, same dictionary permuted", model_method(v3_model, perm_dict.permuted(order))))
    for name, label in (("v1", "V1"), ("ablation", "ablation: U-Net image-to-image"),
                        ("unrolled", "unrolled (MoDL-style black box)")):
        entry = next((e for e in list(registry.baselines.values()) + list(registry.networks.values())
                      if e.get("kind", e.get("version")) == name), None)
        if entry is None:
            log.warning("no trained %s in the manifest; skipped", name)
            continue
        model, _ = load_trained(io.BytesIO(registry.read_verified(entry, name)[0]))
        if name == "v1":
            model.iterations = T
            methods.append(Method("V1, training filter order", model_method(model, perm_dict)))
            methods.append(Method("V1, filters permuted", model_method(model, perm_dict.permuted(order))))
        else:
            methods.append(Method(label, model_method(model, None)))
    if bart.available() and not args.no_bart:
        methods.append(Method("BART pics -l1 -r 0.01", bart_method(0.01)))

    for method in methods:
        if method.run is not None:
            log.info("evaluating %s", method.name)
            evaluate_method(method, volumes)
    by_name = {m.name: m for m in methods}
    ordered = [m for m in methods if m.run is None or m.group != "v3"]

    # figure: one in-distribution and one out-of-distribution slice, then Λ maps
    figure_methods = [m for m in methods if m.run is not None and "permuted" not in m.name
                      and m.name != "CDL-Λ V3, fixed dictionary"]
    figure_methods.insert(2, Method("CDL-Λ V3", model_method(v3_model, default_dict)))
    rows = []
    picks = [next(v for v in volumes if v.split == "test" and v.noise == 0.2),
             next(v for v in volumes if v.split == "ood" and v.noise == 0.2 and v.source == args.figure_ood)
             if any(v.source == args.figure_ood for v in volumes) else
             next(v for v in volumes if v.split == "ood" and v.noise == 0.2)]
    lam_maps = None
    for volume in picks:
        i = volume.batch.target.shape[0] // 2
        one = data.Batch(*(t[i:i + 1] for t in (volume.batch.target, volume.batch.kspace, volume.batch.mask)))
        vmax = float(one.target.abs().max())
        row = [one.target.abs()[0].numpy() / vmax]
        for m in figure_methods:
            image, maps = m.run(one)
            row.append(image.abs()[0].numpy() / vmax)
            if m.name == "CDL-Λ V3" and lam_maps is None:
                lam_maps = maps[0].numpy()
        rows.append(row)
    if lam_maps is not None:
        rows.append([lam_maps[k] / max(float(lam_maps.max()), 1e-12) for k in range(min(len(rows[0]), len(lam_maps)))])
    figure = out_dir / "figures" / f"{args.name}.png"
    write_png(figure, tile(rows))

    filters = default_dict.filters.numpy()
    panels = [0.5 + 0.5 * f / max(float(np.abs(f).max()), 1e-12) for f in filters]
    per_row = 16
    write_png(out_dir / "figures" / f"{args.name}-dictionary.png",
              tile([panels[i:i + per_row] for i in range(0, len(panels), per_row)], gap=1, scale=6))

    caption = ("Rows: an in-distribution test slice and an out-of-distribution slice (" + picks[1].source +
               ") at σ² = 0.2, magnitudes scaled by the target's maximum; then the first Λ maps (CDL-Λ V3, "
               f"dictionary {default_dict.name}, in-distribution slice, common scale). Columns: target, " +
               ", ".join(m.name for m in figure_methods) + ".")
    info = {"command": args.command_line, "grid": grid, "figure_caption": caption,
            "data": (f"{size}×{size} images from the packaged-image splits of lab.images, up to {args.slices} "
                     "slices per source volume, single coil, central k-space window of half the matrix per axis, "
                     "complex Gaussian noise of variance σ² × the variance of the measured k-space (lab.data). Test: "
                     + ", ".join(sorted({v.source for v in volumes if v.split == 'test'})) + "; out of "
                     "distribution: " + ", ".join(sorted({v.source for v in volumes if v.split == 'ood'})) + "."),
            "settings": (f"FISTA T = {T} for every CDL method; scalar λ = {lam:g}, β = {beta:g} (grid search); "
                         f"V3 network {v3.name} (β = {v3.beta:.3f}); training dictionaries averaged: "
                         f"{', '.join(train_subset)}; held-out: {', '.join(held_names)}; permutation test on "
                         f"{perm_dict.name}."),
            "targets": check_targets(by_name),
            "trained": list(registry.networks.values()) + list(registry.baselines.values())}
    report = render_report(ordered, info, f"figures/{figure.name}")
    (out_dir / f"{args.name}.md").write_text(report)
    print(report)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=96, help="image matrix n (n × n)")
    parser.add_argument("--slices", type=int, default=6, help="slices per source volume")
    parser.add_argument("--iterations", type=int, default=32, help="FISTA iterations T for every CDL method")
    parser.add_argument("--network", default="default", help="the V3 network (manifest name)")
    parser.add_argument("--dictionary", default="default", help="dictionary of the scalar baseline and the figure")
    parser.add_argument("--v1-dictionary", default=None,
                        help="dictionary of the V1 network and the permutation test (default: the one V1 was trained on)")
    parser.add_argument("--train-dictionaries", type=int, default=0,
                        help="how many training dictionaries to average (0: all)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 0.5, 0.75, 1.0, 1.5])
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.5, 5.0])
    parser.add_argument("--figure-ood", default="knee", help="source of the out-of-distribution figure row")
    parser.add_argument("--no-bart", action="store_true")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--output-dir", default="docs")
    parser.add_argument("--name", default="evaluation")
    parser.add_argument("--threads", type=int, default=1)


def main(args: argparse.Namespace) -> int:
    import sys

    args.command_line = "cdl-lambda " + " ".join(sys.argv[1:]) if sys.argv[1:] else "cdl-lambda evaluate"
    return run_evaluation(args)
