"""Running the methods of :mod:`lab.evaluation.methods` over identical data and collecting their metrics.

Data (:mod:`lab.datasets`): single-coil, centred k-space window n/2 × n/2 of n × n images (×2 super-resolution per
axis), complex noise of variance σ² × the measured k-space variance, σ² ∈ {0.2, 0.3}, fixed seeds. Sets: ``test``
(in distribution: a human T1 head, :data:`lab.images.SPLITS`) and ``ood`` (macaque brain, EPI contrast, knee). The
scalar λ (and β) of the classical CDL baseline are grid-searched on the ``val`` split at σ² = 0.2.

Metrics (:mod:`lab.metrics`) on magnitudes, per volume (data range = the volume's maximum), averaged over volumes
weighted by their slices: SSIM and NMSE inside the anatomy mask and SSIM/PSNR on the whole image, blur effect.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdl_lambda.lab import datasets as data
from cdl_lambda.lab import images as lab_images
from cdl_lambda.lab import metrics
from cdl_lambda.lab.evaluation import mc_report, methods
from cdl_lambda.lab.evaluation import report, targets
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.weights import WeightsRegistry

log = logging.getLogger(__name__)

NOISE_LEVELS = (0.2, 0.3)


@dataclass
class Volume:
    """One source's evaluation examples at one noise level, and the anatomy mask ``(slices, n, n)``."""

    split: str
    source: str
    noise: float
    batch: data.Batch
    mask: np.ndarray


@dataclass
class Settings:
    """What ``cdl-lambda-lab evaluate`` runs (see its ``--help``)."""

    size: int = 96
    slices: int = 6
    iterations: int = 32
    network: str = "default"
    dictionary: str = "default"
    v1_dictionary: str | None = None
    train_dictionaries: int = 0
    lambdas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)  # noise units
    betas: tuple[float, ...] = (1.0, 2.5, 5.0)
    multicoil: bool = True          # the multi-coil section (lab.evaluation.mc_report)
    multicoil_size: int = 128
    multicoil_slices: tuple[int, int, int] = (2, 3, 2)  # per source: validation, test, out of distribution
    figure_ood: str = "knee"
    bart: bool = True
    weights_dir: str | None = None
    output_dir: str = "evaluation"
    name: str = "evaluation"
    threads: int = 1
    command_line: str = "cdl-lambda-lab evaluate"


# ---- data ------------------------------------------------------------------------------------------------------
def build_volumes(images: dict[str, dict[str, torch.Tensor]], per_source: int,
                  noise_levels=NOISE_LEVELS) -> list[Volume]:
    """Volumes from magnitude slices ``{split: {source: (N, n, n)}}``: up to ``per_source`` slices of each source,
    at each noise level, with fixed seeds."""
    volumes = []
    for split, sources in images.items():
        for source, stack in sources.items():
            picked = data.pick_slices(stack, per_source)
            for noise in noise_levels:
                seed = 1000 + int(noise * 100) + 7 * len(volumes)
                batch = data.fixed_examples(picked, noise, seed=seed)
                volumes.append(Volume(split, source, noise, batch, metrics.foreground_mask(batch.target)))
    return volumes


def load_volumes(size: int, per_source: int, splits=("test", "ood"), noise_levels=NOISE_LEVELS) -> list[Volume]:
    """:func:`build_volumes` on the packaged image splits at ``size × size``."""
    return build_volumes({split: data.load_images(split, size) for split in splits}, per_source, noise_levels)


# ---- running ---------------------------------------------------------------------------------------------------
def _chunked(fn, batch: data.Batch, chunk: int = 4):
    images, lambdas = [], []
    for start in range(0, batch.kspace.shape[0], chunk):
        part = data.Batch(*(t[start:start + chunk] for t in (batch.target, batch.kspace, batch.mask)))
        image, lam = fn(part)
        images.append(image)
        lambdas.append(lam)
    return torch.cat(images), (torch.cat(lambdas) if lambdas[0] is not None else None)


def evaluate_method(method: methods.Method, volumes: list[Volume]) -> None:
    """Run ``method`` on every volume (in chunks of 4 slices), timing it, and record the metrics."""
    for volume in volumes:
        start = time.time()
        image, _ = _chunked(method.run, volume.batch)
        method.seconds += time.time() - start
        method.slices += image.shape[0]
        target = volume.batch.target
        values = {"ssim_mask": metrics.ssim(target, image, volume.mask), "ssim": metrics.ssim(target, image),
                  "psnr": metrics.psnr(target, image), "nmse_mask": metrics.nmse(target, image, volume.mask),
                  "blur": metrics.blur_effect(image, volume.mask)}
        method.results.setdefault((volume.split, volume.noise), []).append((image.shape[0], values))


def evaluate_all(compared: list[methods.Method], volumes: list[Volume]) -> None:
    """:func:`evaluate_method` for every method that runs (merged ones are already pooled)."""
    for method in compared:
        if method.run is not None:
            log.info("evaluating %s", report.display_name(method))
            evaluate_method(method, volumes)


def grid_search_scalar(dictionary: Dictionary, volumes: list[Volume], iterations: int, lambdas, betas,
                       split: str = "val", noise: float = 0.2) -> tuple[float, float, list]:
    """Best (λ, β) of the scalar-λ CDL by brain-masked SSIM on ``volumes`` of (split, noise); also the whole table
    of (λ, β, SSIM)."""
    table = []
    for beta in betas:
        for lam in lambdas:
            method = methods.Method("cdl_scalar", methods.scalar_cdl(dictionary, lam, beta, iterations))
            evaluate_method(method, volumes)
            table.append((lam, beta, method.summary(split, noise)["ssim_mask"]))
    lam, beta, _ = max(table, key=lambda row: row[2])
    return lam, beta, table


# ---- the whole comparison --------------------------------------------------------------------------------------
def run_evaluation(settings: Settings) -> str:
    """The full comparison on the packaged splits with the weights folder's models; writes
    ``output_dir/name.md`` and its figures and returns the report text."""
    torch.set_num_threads(settings.threads)
    registry = WeightsRegistry(settings.weights_dir)
    out_dir = Path(settings.output_dir)
    size, T = settings.size, settings.iterations
    dicts = methods.choose_dictionaries(registry, settings.dictionary, settings.train_dictionaries,
                                  settings.v1_dictionary)

    log.info("grid search of the scalar λ on the validation split")
    validation = load_volumes(size, 6, splits=("val",), noise_levels=(0.2,))
    missing = [name for split in ("val", "test") for name in lab_images.SPLITS[split]
               if not lab_images.available(name)]
    if not validation or missing:
        raise lab_images.SourceUnavailable(
            "the evaluation needs every validation and test image source; missing: " + ", ".join(
                f"{name} ({lab_images.SOURCES[name].package})" for name in missing)
            + ' — install them (pip install -e "./lab[images]", apt-get install mricron-data '
              "insighttoolkit5-examples)")
    lam, beta, grid = grid_search_scalar(dicts.default, validation, T, settings.lambdas, settings.betas)
    volumes = load_volumes(size, settings.slices)
    log.info("%d volumes, %d slices", len(volumes), sum(v.batch.target.shape[0] for v in volumes))

    compared = [methods.Method("zero_filled", methods.zero_filled),
                methods.Method("cdl_scalar", methods.scalar_cdl(dicts.default, lam, beta, T))]
    v3 = registry.network(settings.network)
    v3_model = CDLLambda(v3.network, beta=v3.beta, iterations=T).eval()
    parts = methods.v3_parts(v3_model, registry, dicts.train + dicts.held_out)
    for part in parts.values():
        log.info("V3 with %s", part.detail)
        evaluate_method(part, volumes)
    compared.append(methods.merge("cdl_lambda_v3", [parts[n] for n in dicts.train], "v3"))
    compared.append(methods.merge("cdl_lambda_v3_heldout", [parts[n] for n in dicts.held_out], "v3"))
    if dicts.unseen_k:
        k = registry.dictionaries[dicts.unseen_k[0]]["K"]
        compared.append(methods.merge("cdl_lambda_v3_unseen_k", [parts[n] for n in dicts.unseen_k], "v3",
                                      detail=f"K={k}"))
    compared += methods.learned_methods(registry, v3_model, dicts, T, with_bart=settings.bart, log=log)
    evaluate_all(compared, volumes)

    figure_methods = [m for m in compared if m.run is not None
                      and m.id not in ("cdl_lambda_v3_fixed", "cdl_lambda_v3_permuted", "v1_permuted")]
    figure_methods.insert(2, methods.Method("cdl_lambda_v3_default", methods.model_method(v3_model, dicts.default)))
    info = {"command": settings.command_line, "grid": grid, "trained": report.trained_models(registry),
            "data": report.data_description(size, settings.slices, volumes),
            "settings": (f"FISTA T = {T} for every CDL method; scalar λ = {lam:g}, β = {beta:g} (grid search); "
                         f"V3 network {v3.name} (β = {v3.beta:.3f}); training dictionaries averaged: "
                         f"{', '.join(dicts.train)}; held-out: {', '.join(dicts.held_out)}; permutation test on "
                         f"{dicts.permutation.name}."),
            "targets": [t.line() for t in targets.check_targets({m.id: m for m in compared})]}
    text = report.write_report(out_dir, settings.name, compared, figure_methods, volumes, info,
                               figure_ood=settings.figure_ood, dictionary=dicts.default)
    if settings.multicoil:
        text += "\n" + multicoil_section(settings, registry, v3, dicts, out_dir)
        (out_dir / f"{settings.name}.md").write_text(text)
    return text


def multicoil_section(settings: Settings, registry: WeightsRegistry, loaded, dicts, out_dir: Path) -> str:
    """The multi-coil comparison under the protocol (:mod:`lab.evaluation.mc_report`) at 128² with
    ``settings.multicoil_slices`` (validation, test and T2, out of distribution); its Markdown section, the figure
    written beside."""
    v3_model = CDLLambda.deployed(loaded).eval()
    baselines = mc_report.learned_baselines(registry)
    val, test, ood = settings.multicoil_slices
    size = settings.multicoil_size
    plan = mc_report.Plan("evaluate", {size: {"val": val, "test": test, "t2": test, "ood": ood}},
                          {size: (mc_report.mc_scans.ACCELERATIONS, mc_report.mc_scans.SNRS)}, (size,))
    train = [registry.dictionary(n) for n in dicts.train]
    held = [registry.dictionary(n) for n in dicts.held_out]
    outcome, scans = mc_report.run_size(size, plan, v3_model, train, held, dicts.default, baselines,
                                        with_bart=settings.bart)
    runs = mc_report.figure_methods(v3_model, dicts.default, baselines, settings.bart, outcome.tunings)
    rows = mc_report.figure_rows(scans, runs, outcome.tunings)
    figure = f"figures/{settings.name}-multicoil.png"
    mc_report.write_figure(out_dir / figure, rows)
    caption = ("Rows: " + "; ".join(label for label, _ in rows) + ". Columns: reference, "
               + ", ".join(mc_report.DISPLAY[m] for m in runs) + "; each row scaled by its reference's maximum.")
    description = mc_report.describe(plan, outcome, registry.network(settings.network).name, train, held,
                                     dicts.default)
    return mc_report.render_section(outcome, description, figure, caption)
