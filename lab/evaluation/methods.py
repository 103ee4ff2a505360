"""The reconstruction methods that the evaluation compares, each under a short method id.

A :class:`Method` wraps ``run(batch) -> (image complex (B, n, n), Λ maps (B, K, n, n) or None)`` and collects its
results; ids (``zero_filled``, ``cdl_scalar``, ``cdl_lambda_v3``, …, see :data:`METHOD_IDS`) are what the run, the
targets and the tables refer to; the report alone turns them into display names.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch

from cdl_lambda.lab import bart
from cdl_lambda.lab.datasets import Batch
from cdl_lambda.lab.train import load_trained
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.weights import WeightsRegistry

METHOD_IDS = (
    "zero_filled",             # inverse FFT of the zero-filled k-space
    "cdl_scalar",              # classical CDL with one scalar λ (grid-searched on validation)
    "cdl_lambda_v3",           # CDL-Λ V3, averaged over the training dictionaries
    "cdl_lambda_v3_heldout",   # CDL-Λ V3, averaged over the held-out dictionaries
    "cdl_lambda_v3_unseen_k",  # CDL-Λ V3 on the held-out dictionaries with a filter count K never trained on
    "cdl_lambda_v3_default",   # CDL-Λ V3 with the default dictionary (figure only)
    "cdl_lambda_v3_fixed",     # CDL-Λ V3 with the permutation test's dictionary
    "cdl_lambda_v3_permuted",  # the same dictionary, filters permuted
    "v1",                      # V1 (K-sized U-Net) with its training filter order
    "v1_permuted",             # V1 with the filters permuted
    "unet_ablation",           # the image-only U-Net
    "unrolled",                # the MoDL-style black box
    "bart_pics",               # BART pics ℓ1-wavelet
)


@dataclass
class Method:
    """One method: ``id`` (one of :data:`METHOD_IDS`), ``run`` (None for a merge of several runs), ``detail`` (a
    short qualifier for the display name, e.g. ``K=64``), ``group`` (``v3`` for the per-dictionary parts), timing,
    and ``results``: (split, noise) → list of (slices, metrics dict)."""

    id: str
    run: callable = None
    detail: str = ""
    group: str = ""
    seconds: float = 0.0
    slices: int = 0
    results: dict = field(default_factory=dict)

    def summary(self, split: str, noise: float) -> dict[str, float]:
        """Slice-weighted mean of each metric over the volumes of (split, noise); {} when there are none."""
        rows = self.results.get((split, noise), [])
        total = sum(n for n, _ in rows)
        return {key: sum(n * v[key] for n, v in rows) / total for key in rows[0][1]} if rows else {}


def model_method(model, dictionary: Dictionary | None, iterations: int | None = None):
    """``run`` of a CDL-Λ model (or a baseline network) with a dictionary, no gradients."""
    @torch.no_grad()
    def run(batch: Batch):
        kwargs = {"iterations": iterations} if iterations else {}
        out = model(batch.kspace, batch.mask, dictionary, **kwargs)
        lam = out.lambda_maps if out.lambda_maps.shape[1] else None
        return out.image, lam
    return run


def zero_filled(batch: Batch):
    """Aᴴy: the inverse FFT of the zero-filled k-space."""
    return _fft.ifft2c(batch.kspace), None


def scalar_cdl(dictionary: Dictionary, lam: float, beta: float, iterations: int):
    """``run`` of classical CDL with one scalar λ and (PH) split β."""
    return model_method(CDLLambda(None, beta=beta, iterations=iterations, scalar_lambda=lam).eval(), dictionary)


def bart_method(regularization: float = 0.01):
    """``run`` of BART ``pics -l1 -r regularization``."""
    def run(batch: Batch):
        return torch.from_numpy(bart.pics(batch.kspace.numpy(), regularization)), None
    return run


def merge(method_id: str, parts: list[Method], group: str = "", detail: str = "") -> Method:
    """Pool several methods' results (e.g. one CDL-Λ network over several dictionaries)."""
    merged = Method(method_id, run=None, group=group, detail=detail)
    for part in parts:
        merged.seconds += part.seconds
        merged.slices += part.slices
        for key, rows in part.results.items():
            merged.results.setdefault(key, []).extend(rows)
    return merged


@dataclass
class Dictionaries:
    """Which dictionaries of the weights folder the comparison uses."""

    default: Dictionary
    train: list[str]           # the training dictionaries averaged
    held_out: list[str]        # split != train
    unseen_k: list[str]        # held-out dictionaries whose K no training dictionary has
    permutation: Dictionary    # the dictionary of V1 and of the permutation test


def choose_dictionaries(registry: WeightsRegistry, default: str, train_count: int = 0,
                        v1_dictionary: str | None = None) -> Dictionaries:
    """The evaluation's dictionaries: ``train_count`` training ones evenly spread (0: all), every held-out one,
    and the dictionary V1 was trained on (or ``v1_dictionary``, else the default) for the permutation test."""
    default_dict = registry.dictionary(default)
    train_names = sorted(n for n, e in registry.dictionaries.items() if e.get("split") == "train")
    held_names = sorted(n for n, e in registry.dictionaries.items() if e.get("split") != "train")
    train_k = {registry.dictionaries[n]["K"] for n in train_names}
    unseen = [n for n in held_names if registry.dictionaries[n]["K"] not in train_k]
    count = train_count or len(train_names)
    train_subset = train_names[::max(1, len(train_names) // count)][:count] if train_names else []
    v1_entry = next((e for e in registry.networks.values() if e.get("version") == "v1"), None)
    v1_name = v1_dictionary or (v1_entry or {}).get("training", {}).get("dictionaries")
    permutation = registry.dictionary(v1_name) if v1_name else default_dict
    return Dictionaries(default_dict, train_subset, held_names, unseen, permutation)


def v3_parts(model, registry: WeightsRegistry, names: list[str]) -> dict[str, Method]:
    """One ``cdl_lambda_v3`` method per dictionary name (to be evaluated, then merged)."""
    return {name: Method("cdl_lambda_v3", model_method(model, registry.dictionary(name)), detail=name, group="v3")
            for name in dict.fromkeys(names)}


def learned_methods(registry: WeightsRegistry, v3_model, dictionaries: Dictionaries, iterations: int,
                    with_bart: bool = True, log=None) -> list[Method]:
    """The methods beyond the V3 dictionary averages: V3 on a fixed and a permuted dictionary, V1 (same two), the
    U-Net ablation and the unrolled network when the manifest has them, and BART when installed."""
    order = torch.randperm(dictionaries.permutation.num_filters, generator=torch.Generator().manual_seed(0))
    permuted = dictionaries.permutation.permuted(order)
    methods = [Method("cdl_lambda_v3_fixed", model_method(v3_model, dictionaries.permutation)),
               Method("cdl_lambda_v3_permuted", model_method(v3_model, permuted))]
    for kind, method_id in (("v1", "v1"), ("ablation", "unet_ablation"), ("unrolled", "unrolled")):
        entry = next((e for e in list(registry.baselines.values()) + list(registry.networks.values())
                      if e.get("kind", e.get("version")) == kind), None)
        if entry is None:
            if log:
                log.warning("no trained %s in the manifest; skipped", kind)
            continue
        model, _ = load_trained(io.BytesIO(registry.read_verified(entry, kind)[0]))
        if kind == "v1":
            model.iterations = iterations
            methods.append(Method("v1", model_method(model, dictionaries.permutation)))
            methods.append(Method("v1_permuted", model_method(model, permuted)))
        else:
            methods.append(Method(method_id, model_method(model, None)))
    if with_bart and bart.available():
        methods.append(Method("bart_pics", bart_method(0.01)))
    return methods
