"""A model on the product's scans (:func:`lab.evaluation.scans.product_scans`) as a site runs it: each scan with its
own ESPIRiT maps, in noise units (σ = 1 after prewhitening), the data check on, the magnitude scored against the truth
by the protocol (:func:`lab.evaluation.protocol.score`, no rescaling). Training keeps its best checkpoint by these
scores (``--held-out-scans``) and bench/codesign.py tables them, from this one loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from cdl_lambda.lab.evaluation.protocol import score
from cdl_lambda.recon.dictionary import Dictionary


@dataclass
class ScanResult:
    """One product scan's reconstruction: where it came from, its quality and what the solve did."""
    contrast: str
    acceleration: int
    size: int                 # the matrix n: every product scan is n × n (lab.evaluation.scans.product_scans)
    ssim: float
    nrmse: float
    iterations_used: int
    residual_to_noise: float
    seconds: float


def reconstruct_and_score(model: nn.Module, items, dictionary: Dictionary,
                          iterations: int | None = None) -> list[ScanResult]:
    """``model`` (a :class:`recon.model.CDLLambda`, evaluated in eval mode and left in the mode it was in) on every
    ``(contrast, R, scan)`` of ``items``, at ``iterations`` (None: the model's cap)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = []
    try:
        for contrast, acceleration, scan in items:
            start = time.perf_counter()
            with torch.no_grad():
                out = model(scan.kspace[None].to(device), scan.mask.to(device), dictionary,
                            coil_maps=scan.maps[None].to(device), noise_std=1.0, iterations=iterations)
            seconds = time.perf_counter() - start
            quality = score(out.image[0].cpu().numpy(), scan.reference)
            results.append(ScanResult(contrast, int(acceleration), int(scan.kspace.shape[-1]), quality["ssim"],
                                      quality["nrmse"], int(out.iterations_used[0]),
                                      float(out.residual_to_noise[0]), seconds))
    finally:
        model.train(was_training)
    return results


def mean_quality(results: list[ScanResult], key) -> dict:
    """{``key(result)``: (mean SSIM, mean NRMSE)} over ``results`` grouped by ``key`` (in order of first appearance)."""
    groups: dict = {}
    for result in results:
        groups.setdefault(key(result), []).append(result)
    return {group: (float(np.mean([r.ssim for r in members])), float(np.mean([r.nrmse for r in members])))
            for group, members in groups.items()}


def held_out_score(results: list[ScanResult], ssim_weight: float) -> float:
    """mean NRMSE² + ``ssim_weight`` · (1 − mean SSIM) over ``results``: the training loss's form, lower is better
    (the score training keeps its best checkpoint by, lab.train.score_held_out)."""
    ssim = float(np.mean([r.ssim for r in results]))
    return float(np.mean(np.square([r.nrmse for r in results]))) + ssim_weight * (1 - ssim)
