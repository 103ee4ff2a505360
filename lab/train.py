"""Training NET_Θ (V1/V2/V3) and the learned baselines.

Data (``--data``):
* ``multicoil`` (default): scans as the gadget receives them after prewhitening — 1–16 coils, R = 1–4 with 12–32
  calibration lines, SNR 5–40, ESPIRiT maps estimated from the calibration lines, and the paper's single-coil
  low-resolution windows (:mod:`lab.multicoil`).
* ``lowres``: the paper's single-coil low-resolution task alone (:class:`lab.datasets.LowFieldDataset`).

Methods (``--method``):
* ``v3``: CDL-Λ with the shared per-filter U-Net; **a random training dictionary for every batch** (the manifest's
  ``split: train`` family); validated on the held-out (``split: validation``) dictionaries.
* ``v1`` / ``v2``: CDL-Λ with a K-sized U-Net and one fixed dictionary (``--dictionary``).
* ``ablation``: the same U-Net mapping x₀ to the image, no model-based part (:class:`lab.baselines.ImageUNet`).
* ``unrolled``: the black-box MoDL-style unrolled network (:class:`lab.baselines.UnrolledNet`).

Units: everything works in units of the noise (:mod:`recon.model`). Λ = u_b · sigmoid(u) with u_b =
``--upper-bound`` (the best scalar λ on validation data is about 1 noise unit, so u_b = 6 keeps the optimum on the
responsive part of the sigmoid) and the U-Net head's bias set so that Λ starts at ``--initial-lambda`` everywhere:
the network starts as the scalar-λ baseline, and a Λ at the bound (saturated sigmoid) or one that zeroes every
code (no gradient through the soft-threshold) would stall training.

Loss: the relative squared error of the image, plus ``--ssim-weight`` · (1 − SSIM) (:func:`lab.losses.image_loss`).
Adam with the network at ``--lr`` (weight decay ``--weight-decay``) and the scalar parameters (β of the (PH) split,
μ of the unrolled net) at ``--beta-lr``. CDL-Λ runs ``--iterations`` solver steps (T) and differentiates the last
``--grad-iterations`` (T − T′); validation (relative squared error and SSIM) runs ``--val-iterations``, the deployed
cap. Checkpoints hold the model, optimiser, step, history and every random-number
state, so ``--resume`` continues the exact run. ``--export NAME`` writes the trained weights into the weights folder
with a manifest entry.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from cdl_lambda.lab import datasets as data
from cdl_lambda.lab import distributed
from cdl_lambda.lab import multicoil
from cdl_lambda.lab.losses import background_loss, image_loss, relative_squared_error, ssim
from cdl_lambda.lab.baselines import BASELINES, build_baseline
from cdl_lambda.lab.evaluation import product, scans
from cdl_lambda.lab.manifest import update_manifest
from cdl_lambda.recon.background import FORMS, STEPS
from cdl_lambda.recon.device import choose_device
from cdl_lambda.recon.dictionary import Dictionary
from cdl_lambda.recon.lambda_nets import NETWORKS, UNet, build_lambda_net, set_trained_matrix
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.checksum import sha256_of
from cdl_lambda.recon.weights import WeightsRegistry, save_network, trained_matrix

log = logging.getLogger(__name__)

METHODS = ("v3", "v2", "v1", "ablation", "unrolled")


@dataclasses.dataclass
class TrainConfig:
    method: str = "v3"
    size: int = 96                 # n × n matrix of the training images
    batch_size: int = 2
    steps: int = 1000
    iterations: int = 24           # T
    grad_iterations: int = 6       # T − T′: differentiated iterations
    base_channels: int = 8
    stages: int = 2
    data: str = "multicoil"        # "multicoil": scans as the gadget gets them (lab.multicoil); "lowres": the
                                   # paper's single-coil central k-space window (lab.datasets)
    upper_bound: float = 6.0       # u_b of Λ = u_b · sigmoid(u), noise units
    initial_lambda: float = 1.0    # Λ at initialisation (sets the U-Net head's bias), noise units
    beta: float = 1.0              # initial β of the (PH) split
    cascades: int = 4              # unrolled baseline
    lr: float = 1e-4
    weight_decay: float = 1e-5
    beta_lr: float = 0.1
    dictionary: str | None = None  # v1/v2: the fixed dictionary
    validate_every: int = 100
    validation_slices: int = 6
    seed: int = 0
    time_limit_min: float | None = None
    weights_dir: str | None = None
    solver: str = "fista"          # the solver trained through (recon.model.SOLVERS)
    tolerance: float = 0.0         # its stopping rule (0: always the cap, ``iterations``)
    val_iterations: int = 64       # the cap at validation (the deployed one)
    init_network: str | None = None  # start from this shipped network or baseline (fine-tuning), not from scratch
    checkpoint_every: int = 0      # also write the checkpoint every this many steps (0: only at validation)
    ssim_weight: float = 0.0       # loss = relative squared error + ssim_weight · (1 − SSIM) (lab.losses)
    contrasts: bool = True         # multicoil: also train on T1/T2/PD/FLAIR contrasts synthesised from tissue
                                   # fractions (lab.contrasts)
    mixed_size: int = 0            # multicoil: also train (and validate) at this n × n matrix (0: only ``size``)
    mixed_fraction: float = 0.5    # the share of batches at ``mixed_size``
    background: bool = False       # v3: also infer the background weight b (recon.background)
    background_supervision: float = 0.0  # loss += this · BCE(b, the target's background) (lab.losses)
    background_pretrain: int = 0   # before step 1: this many steps training b alone on that BCE
    background_lr: float = 1e-3    # Adam learning rate of b's network in those steps
    background_dropout: float = 0.0  # share of training batches solved without b, as a withdrawn slice is
                                     # (recon.background.data_disagreement): keeps that image good
    background_form: str = "penalty"  # how (PR) uses b: "penalty" or "factor" (recon.background.FORMS)
    background_step: str = "uniform"  # the penalty form's FISTA step: "uniform" or "local" (recon.background.STEPS)
    context: bool = False  # v3: each filter's U-Net also sees x0 and the filters' mean response (lambda_nets)
    lambda_passes: int = 1  # FISTA passes, Λ inferred again from the image before each after the first
    freeze_background: bool = False  # keep b's network and its gains as they start: only Λ's network and β train
    background_only: bool = False  # train b's network and its gains alone: Λ's network and β stay as they start
    scan_mix: str = "broad"        # multicoil: the training scans' draws (lab.multicoil.SCAN_MIXES)
    warmup_steps: int = 0          # raise both learning rates linearly from 0 over this many steps (a fresh Adam's
                                   # first steps move every weight by about lr, whatever its gradient)
    held_out_scans: int = 0        # CDL-Λ: also score this many slices per contrast of the validation person as the
                                   # product sees them (at each matrix it trains at) at every validation, and keep
                                   # the best checkpoint by them

    @property
    def trained_matrix(self) -> int:
        """The largest matrix the run trains at (``size``, or ``mixed_size`` when larger)."""
        return max(self.size, self.mixed_size or 0)


# ---- models ----------------------------------------------------------------------------------------------------
def build_model(config: TrainConfig, num_filters: int | None = None) -> nn.Module:
    """The module for ``config.method`` (``num_filters`` needed for v1/v2)."""
    if config.method in BASELINES:
        extra = {"cascades": config.cascades} if config.method == "unrolled" else {}
        model = build_baseline(dict(kind=config.method, base_channels=config.base_channels, stages=config.stages,
                                    **extra))
        if config.init_network:  # fine-tuning: the shipped baseline's weights (and μ)
            model.load_state_dict(shipped_baseline_state(config, model))
        return model
    net_config = dict(version=config.method, base_channels=config.base_channels, stages=config.stages,
                      upper_bound=config.upper_bound)
    if config.method in ("v1", "v2"):
        net_config["num_filters"] = num_filters
    if not 0 <= config.background_dropout < 1:
        raise ValueError(f"--background-dropout must be in [0, 1), got {config.background_dropout}")
    if config.background_dropout and not config.background:
        raise ValueError("--background-dropout needs --background")
    if config.held_out_scans and config.method != "v3":
        raise ValueError("--held-out-scans needs --method v3 (the scans are scored with the default dictionary)")
    if config.background_form not in FORMS:
        raise ValueError(f"--background-form must be one of {', '.join(FORMS)}, got {config.background_form!r}")
    if config.background_form != "penalty" and not config.background:
        raise ValueError("--background-form needs --background")
    if config.background_step not in STEPS:
        raise ValueError(f"--background-step must be one of {', '.join(STEPS)}, got {config.background_step!r}")
    if config.background_step != "uniform" and (not config.background or config.background_form != "penalty"):
        raise ValueError("--background-step local needs --background in the penalty form")
    if config.freeze_background and not config.background:
        raise ValueError("--freeze-background needs --background")
    if config.background_only and not (config.background and config.init_network):
        raise ValueError("--background-only needs --background and --init-network (a trained Λ network to keep)")
    if config.background_only and (config.freeze_background or config.background_dropout):
        raise ValueError("--background-only leaves nothing to train with --freeze-background, or in the batches "
                         "--background-dropout solves without the weight")
    if config.context:
        if config.method != "v3":
            raise ValueError("--context needs --method v3")
        net_config["context"] = True
    if config.background:
        if config.method != "v3":
            raise ValueError("--background needs --method v3")
        net_config["background"] = True
        if config.background_form != "penalty":
            net_config["background_form"] = config.background_form
        if config.background_step != "uniform":
            net_config["background_step"] = config.background_step
    network = build_lambda_net(net_config)
    beta = config.beta
    if config.init_network:  # fine-tuning: the shipped network's weights and β
        loaded = WeightsRegistry(config.weights_dir).network(config.init_network)
        load_shipped_network(network, loaded.network, config.init_network)
        beta = loaded.beta
    else:
        with torch.no_grad():  # start where soft-thresholding neither keeps all noise nor kills every code
            fraction = min(max(config.initial_lambda / config.upper_bound, 1e-3), 1 - 1e-3)
            network.unet.head.bias.fill_(math.log(fraction / (1 - fraction)))
    if config.freeze_background:  # b's network and gains stay as they start: the optimiser leaves them out
        network.background.requires_grad_(False)
    if config.background_only:  # Λ's network and β stay as they start: only b's network and gains train
        network.requires_grad_(False)
        network.background.requires_grad_(True)
    model = CDLLambda(network, beta=beta, iterations=config.iterations, grad_iterations=config.grad_iterations,
                      solver=config.solver, tolerance=config.tolerance, lambda_passes=config.lambda_passes)
    if config.background_only:
        model.split.requires_grad_(False)
    return model


def load_shipped_network(network: nn.Module, shipped: nn.Module, name: str) -> None:
    """Copy a shipped Λ network's weights into ``network`` of the same architecture, or of a larger one that starts
    as the shipped one computes: a shipped network without a background weight may start one that has it (the new
    weight keeps its initialisation), one without the filter context one with it, one with fewer base channels a
    wider one (:meth:`recon.lambda_nets.UNet.load_narrower`: the new inputs and channels start unread)."""
    own, theirs = dict(network.config()), dict(shipped.config())
    own_background, their_background = own.pop("background", False), theirs.pop("background", False)
    own_context, their_context = own.pop("context", False), theirs.pop("context", False)
    own_base, their_base = own.pop("base_channels"), theirs.pop("base_channels")
    for solve in ("background_form", "background_step"):  # a network may move to another form or step
        own.pop(solve, None), theirs.pop(solve, None)
    if (own != theirs or (their_background and not own_background) or (their_context and not own_context)
            or their_base > own_base):
        raise ValueError(f"--init-network {name}: its architecture {shipped.config()} differs from the configured "
                         f"{network.config()}")
    state = shipped.state_dict()
    if own_context == their_context and own_base == their_base:
        network.load_state_dict(state, strict=own_background == their_background)
        return
    unets = [prefix for prefix, module in network.named_modules() if isinstance(module, UNet)]
    inside = {prefix: {key[len(prefix) + 1:]: value for key, value in state.items() if key.startswith(prefix + ".")}
              for prefix in unets}
    rest = {key: value for key, value in state.items() if not any(key.startswith(p + ".") for p in unets)}
    network.load_state_dict(rest, strict=False)  # the gains; the U-Nets below
    for prefix in unets:
        if inside[prefix]:  # a background U-Net the shipped network lacks keeps its initialisation
            network.get_submodule(prefix).load_narrower(inside[prefix], their_base)


def shipped_baseline_state(config: TrainConfig, model: nn.Module) -> dict:
    """The state dict of the shipped baseline ``config.init_network``, checked against the configured model."""
    registry = WeightsRegistry(config.weights_dir)
    entry = registry.baselines.get(config.init_network)
    if entry is None or entry.get("kind") != config.method:
        raise ValueError(f"--init-network {config.init_network}: no shipped {config.method} baseline of that name "
                         f"(have: {', '.join(sorted(registry.baselines)) or 'none'})")
    shipped, _ = load_trained(io.BytesIO(registry.read_verified(entry, "baseline")[0]))
    if shipped.config() != model.config():
        raise ValueError(f"--init-network {config.init_network}: its architecture {shipped.config()} differs from "
                         f"the configured {model.config()}")
    return shipped.state_dict()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam: network weights at ``lr`` with weight decay; scalar parameters (β, μ) at ``beta_lr`` without (each
    group keeps its rate as ``full_lr`` for the warm-up, :func:`set_warmup`); parameters that do not require
    gradients (a frozen background weight, :func:`build_model`) are left out."""
    trained = [p for p in model.parameters() if p.requires_grad]
    scalars = [p for p in trained if p.ndim == 0]
    weights = [p for p in trained if p.ndim > 0]
    return torch.optim.Adam([{"params": weights, "lr": config.lr, "full_lr": config.lr,
                              "weight_decay": config.weight_decay},
                             {"params": scalars, "lr": config.beta_lr, "full_lr": config.beta_lr,
                              "weight_decay": 0.0}])


def set_warmup(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int) -> None:
    """Learning rates for training step ``step`` (1-based): full_lr · min(1, step / warmup_steps)."""
    factor = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("full_lr", group["lr"]) * factor  # checkpoints from before keep their rate


def training_dictionaries(registry: WeightsRegistry, config: TrainConfig) -> tuple[list[Dictionary], list[Dictionary]]:
    """(training dictionaries, validation dictionaries) for the method: the family for v3, the fixed one for v1/v2,
    none for the baselines."""
    if config.method in BASELINES:
        return [], []
    if config.method in ("v1", "v2"):
        fixed = registry.dictionary(config.dictionary)
        return [fixed], [fixed]
    train = [registry.dictionary(n) for n, e in sorted(registry.dictionaries.items()) if e.get("split") == "train"]
    val = [registry.dictionary(n) for n, e in sorted(registry.dictionaries.items()) if e.get("split") != "train"]
    if not train:
        raise RuntimeError("the weights manifest lists no training dictionaries: run `cdl-lambda-lab learn-dictionary "
                           "--family` first")
    return train, val or train


def reconstruct(model: nn.Module, batch, dictionary: Dictionary | None, **kwargs):
    return model(batch.kspace, batch.mask, dictionary, coil_maps=batch.coil_maps, noise_std=batch.noise_std,
                 **kwargs)


@torch.no_grad()
def validate(model: nn.Module, examples, dictionaries: list[Dictionary], iterations: int = 64) -> dict[str, float]:
    """Mean relative squared error (``loss``) and SSIM (``ssim``) over the validation batches (a Batch or a list of
    them) and, for CDL-Λ, the validation dictionaries, at the deployed iteration cap (with the model's stopping
    rule)."""
    model.eval()
    batches = examples if isinstance(examples, list) else [examples]
    extra = {"iterations": iterations} if hasattr(model, "lambda_net") else {}
    errors, similarities = [], []
    for d in dictionaries or [None]:
        for b in batches:
            image = reconstruct(model, b, d, **extra).image
            errors.append(float(relative_squared_error(image, b.target)))
            similarities.append(float(ssim(image, b.target)))
    model.train()
    return {"loss": sum(errors) / len(errors), "ssim": sum(similarities) / len(similarities)}


def score_held_out(model: nn.Module, items, dictionary: Dictionary, iterations: int, ssim_weight: float) -> dict:
    """Mean SSIM and NRMSE of the product's reconstruction of ``items`` (:mod:`lab.evaluation.product`: each scan
    with its own coil maps, the data check on) with ``dictionary``; ``score``: :func:`product.held_out_score`;
    ``by_size``: {matrix: (SSIM, NRMSE)}."""
    results = product.reconstruct_and_score(model, items, dictionary, iterations)
    by_size = dict(sorted(product.mean_quality(results, lambda r: r.size).items()))
    return {"ssim": float(np.mean([r.ssim for r in results])), "nrmse": float(np.mean([r.nrmse for r in results])),
            "by_size": by_size, "score": product.held_out_score(results, ssim_weight)}


def best_checkpoint_path(checkpoint: Path) -> Path:
    """Where ``--held-out-scans`` keeps the best checkpoint of a run: beside it, ``NAME-best.ckpt``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}-best{checkpoint.suffix}")


# ---- the loop --------------------------------------------------------------------------------------------------
class Trainer:
    """Holds everything a checkpoint restores: model, optimiser, data stream, dictionary sampler, history."""

    def __init__(self, config: TrainConfig, device=None, images: torch.Tensor | None = None,
                 validation: data.Batch | None = None, registry: WeightsRegistry | None = None,
                 fractions: torch.Tensor | None = None, mixed_images: torch.Tensor | None = None,
                 mixed_fractions: torch.Tensor | None = None):
        self.config = config
        self.rank = distributed.current()  # torchrun: this process's rank (lab.distributed); else rank 0 of 1
        self.device = self.rank.device(choose_device(device))
        torch.manual_seed(config.seed)
        registry = self.registry = registry or WeightsRegistry(config.weights_dir)
        self.train_dicts, self.val_dicts = training_dictionaries(registry, config)
        k = self.train_dicts[0].num_filters if config.method in ("v1", "v2") else None
        self.model = build_model(config, k).to(self.device)
        if config.method in NETWORKS:  # scored on held-out scans as it will be deployed
            set_trained_matrix(self.model.lambda_net, config.trained_matrix)
        self.optimizer = make_optimizer(self.model, config)
        if config.data not in ("multicoil", "lowres"):
            raise ValueError(f"unknown training data {config.data!r}: multicoil or lowres")
        if config.mixed_size and config.data != "multicoil":
            raise ValueError("--mixed-size needs --data multicoil")
        data_seed = self.rank.data_seed(config.seed)  # each process draws its own examples
        if config.data == "multicoil":
            self.stream = self._multicoil_stream(config.size, data_seed, images, fractions)
            if config.mixed_size:  # a second matrix size: batch by batch, one or the other
                other = self._multicoil_stream(config.mixed_size, data_seed + 1, mixed_images, mixed_fractions)
                self.stream = multicoil.MixedStream([self.stream, other],
                                                    [1 - config.mixed_fraction, config.mixed_fraction], data_seed)
        else:
            images = torch.cat(list(data.load_images("train", config.size).values())) if images is None else images
            self.stream = data.TrainingStream(images, config.batch_size, seed=data_seed)
        if validation is None:
            if config.data == "multicoil":
                validation = [batch for size in (config.size, config.mixed_size) if size
                              for batch in multicoil.validation_batches(
                                  np.concatenate(list(data.validation_images(size).values())), seed=config.seed + 1)]
            else:
                val_sets = data.load_images("val", config.size)
                val_images = torch.cat([data.pick_slices(s, config.validation_slices // 2 or 1)
                                        for s in val_sets.values()])
                validation = data.fixed_examples(val_images, 0.2, seed=config.seed + 1)
        self.validation = ([b.to(self.device) for b in validation] if isinstance(validation, list)
                           else validation.to(self.device))
        self.sampler = torch.Generator().manual_seed(data_seed + 2)
        self.forward_model = self.rank.wrap(self.model,  # DistributedDataParallel under torchrun
                                            skips_parameters=config.background_dropout > 0
                                            or config.background_form == "factor")  # γ_R unused
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.held_out = None  # --held-out-scans: the scans, simulated at the first validation

    def _multicoil_stream(self, size: int, seed: int, images=None, fractions=None) -> multicoil.TrainingStream:
        """Scans of the training split at ``size``² (``images``, default: loaded), with contrasts synthesised from
        the tissue fractions of its T1 volumes when the config asks for them."""
        if images is None:
            images = torch.cat(list(data.load_images("train", size).values()))
            if self.config.contrasts and fractions is None:
                fractions = data.training_fractions(size)
        return multicoil.TrainingStream(images.numpy(), self.config.batch_size, seed=seed,
                                        fractions=None if fractions is None else fractions.numpy(),
                                        mix=self.config.scan_mix)

    def next_dictionary(self) -> Dictionary | None:
        if not self.train_dicts:
            return None
        return self.train_dicts[int(torch.randint(len(self.train_dicts), (), generator=self.sampler))]

    def pretrain_background(self, steps: int) -> list[float]:
        """``steps`` Adam steps on the background weight's network alone (its cross-entropy against the targets'
        background, lab.losses), before the first training step: a new weight starts where it is right, so the
        joint training begins from the network it fine-tunes. Returns the losses."""
        weight = getattr(self.model.lambda_net, "background", None)
        if weight is None:
            raise ValueError("--background-pretrain needs --background")
        with torch.no_grad():  # from b = ½ everywhere: the cross-entropy moves it both ways at once
            weight.unet.head.bias.zero_()
        optimizer = torch.optim.Adam(weight.unet.parameters(), lr=self.config.background_lr)
        losses = []
        for _ in tqdm(range(steps), desc="background weight", disable=not self.rank.is_main):
            batch = next(self.stream).to(self.device)
            optimizer.zero_grad(set_to_none=True)
            b = self.model.background_weight(batch.kspace, batch.mask, batch.coil_maps, batch.noise_std)
            loss = background_loss(b, batch.target)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        log.info("background weight pretrained: %d steps, cross-entropy %.3f → %.3f", steps,
                 sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:]))
        return losses

    def train_step(self) -> float:
        batch = next(self.stream).to(self.device)
        dictionary = self.next_dictionary()
        self.optimizer.zero_grad(set_to_none=True)
        set_warmup(self.optimizer, self.step + 1, self.config.warmup_steps)
        extra = {}
        if self.config.background_dropout:  # some batches solved as a withdrawn slice is: without the weight
            drop = float(torch.rand((), generator=self.sampler)) < self.config.background_dropout
            extra = {"with_background": not drop}
        output = reconstruct(self.forward_model, batch, dictionary, **extra)
        loss = image_loss(output.image, batch.target, self.config.ssim_weight)
        if self.config.background_supervision and getattr(output, "background", None) is not None:
            loss = loss + self.config.background_supervision * background_loss(output.background, batch.target)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def beta(self) -> float | None:
        split = getattr(self.model, "split", None)
        return float(split.beta.detach()) if split is not None else None

    def run(self, checkpoint: Path | None = None, progress: bool = True) -> list[dict]:
        config = self.config
        start, running = time.time() - self.seconds, []
        if self.step == 0 and config.background_pretrain:
            self.pretrain_background(config.background_pretrain)
        bar = tqdm(total=config.steps, initial=self.step, disable=not (progress and self.rank.is_main),
                   desc=config.method)
        while self.step < config.steps:
            running.append(self.train_step())
            self.seconds = time.time() - start
            bar.update(1)
            bar.set_postfix(loss=f"{running[-1]:.4f}")
            last = self.step == config.steps or (config.time_limit_min and self.seconds > 60 * config.time_limit_min)
            last = self.rank.agree(bool(last))  # every process stops at the same step
            if self.step % config.validate_every == 0 or last:
                train_loss = self.rank.mean(sum(running) / len(running))
                running = []
                if not self.rank.is_main:  # rank 0 validates, logs and writes the checkpoint
                    if last:
                        break
                    continue
                scores = validate(self.model, self.validation, self.val_dicts, config.val_iterations)
                record = {"step": self.step, "seconds": round(self.seconds, 1), "train_loss": round(train_loss, 6),
                          "val_loss": round(scores["loss"], 6), "val_ssim": round(scores["ssim"], 4)}
                if self.beta() is not None:
                    record["beta"] = round(self.beta(), 4)
                best = self.held_out_record(record)
                self.history.append(record)
                running = []
                log.info("%s", record)
                if checkpoint:
                    self.save(checkpoint)
                    if best:
                        self.save(best_checkpoint_path(checkpoint))
            elif checkpoint and config.checkpoint_every and self.step % config.checkpoint_every == 0:
                self.save(checkpoint)
            if last:
                break
        bar.close()
        return self.history

    def held_out_record(self, record: dict) -> bool:
        """With ``--held-out-scans``: add the held-out scans' SSIM, NRMSE and score to ``record`` and say whether
        the score is the best of the run so far (the scans are simulated at the first call)."""
        if not self.config.held_out_scans:
            return False
        if self.held_out is None:  # at every matrix the run trains at
            self.held_out = [item for size in (self.config.size, self.config.mixed_size) if size
                             for item in scans.product_scans("val", self.config.held_out_scans, size)]
            self.held_out_dictionary = self.registry.dictionary(None)
        scores = score_held_out(self.model, self.held_out, self.held_out_dictionary, self.config.val_iterations,
                                self.config.ssim_weight)
        record.update(held_out_ssim=round(scores["ssim"], 4), held_out_nrmse=round(scores["nrmse"], 4),
                      held_out_score=round(scores["score"], 6))
        if len(scores["by_size"]) > 1:  # a mixed-size run: each matrix's own figures too
            for size, (ssim_mean, nrmse) in scores["by_size"].items():
                record[f"held_out_{size}"] = [round(ssim_mean, 4), round(nrmse, 4)]
        earlier = [r["held_out_score"] for r in self.history if "held_out_score" in r]
        return not earlier or record["held_out_score"] < min(earlier)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "seconds": self.seconds,
                "history": self.history, "stream": self.stream.state(), "sampler": self.sampler.get_state(),
                "torch": torch.get_rng_state()}

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.stream.set_state(state["stream"])
        self.sampler.set_state(state["sampler"].cpu())
        torch.set_rng_state(state["torch"].cpu())
        if self.rank.rank:  # the checkpoint holds rank 0's draws: this process goes on with its own
            self.sampler.manual_seed(self.rank.data_seed(self.config.seed) + 2 + self.step)


# ---- export ----------------------------------------------------------------------------------------------------
def load_trained(path, device="cpu") -> tuple[nn.Module, dict]:
    """A trained model from a checkpoint or an exported file (a path or a file object; either kind):
    (module in eval mode, payload)."""
    payload = torch.load(path, map_location=device, weights_only=True)
    if "model" in payload:  # a training checkpoint
        config = TrainConfig(**payload["config"])
        k = None
        if config.method in ("v1", "v2"):
            k = payload["model"]["lambda_net.unet.head.weight"].shape[0]
        model = build_model(config, k)
        model.load_state_dict(payload["model"])
        if config.method in NETWORKS:
            set_trained_matrix(model.lambda_net, config.trained_matrix)
    elif payload["config"].get("kind") in BASELINES:
        model = build_baseline(payload["config"])
        model.load_state_dict(payload["state_dict"])
    else:
        settings = payload.get("settings") or {}
        model = CDLLambda(build_lambda_net(payload["config"]), beta=payload.get("beta", 1.0),
                          iterations=settings.get("iterations", 64), solver=settings.get("solver", "fista"),
                          tolerance=settings.get("tolerance", 0.0))
        model.lambda_net.load_state_dict(payload["state_dict"])
        set_trained_matrix(model.lambda_net, trained_matrix(settings))
    return model.to(device).eval(), payload


def export(checkpoint: Path, name: str, weights_dir: Path, set_default: bool = False, note: str = "",
           default_dictionary: str | None = None, deployed_iterations: int | None = None) -> dict:
    """Write the trained weights of ``checkpoint`` into ``weights_dir`` (networks/ for Λ networks, baselines/ for the
    others) and record them in the manifest. The entry's ``solver`` is the one trained through, with
    ``deployed_iterations`` as its cap (default: the validation cap, ``--val-iterations``). Returns the entry."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = TrainConfig(**state["config"])
    model, _ = load_trained(checkpoint)
    described = (("lab.multicoil.TrainingStream: 1-16 coils (rings and arcs, prewhitened channel mixing), R 1-4 "
                  "outside 12-32 calibration lines, image SNR 5-40, ESPIRiT maps from the calibration lines, and "
                  "single-coil low-resolution windows" if config.scan_mix == "broad" else
                  "lab.multicoil.TrainingStream, site mix: 8-16 coils (rings and arcs, prewhitened channel mixing), "
                  "R 2-4 outside 12-32 calibration lines, image SNR 8-30, ESPIRiT maps from the calibration lines")
                 if config.data == "multicoil" else
                 "lab.datasets.LowFieldDataset: central k-space window with 40-119/320 lines removed per side, "
                 "sigma^2 ~ U(0.15, 0.30)")
    contrasts = (", and 60 % of batches T1 (inversion recovery), T2, PD or FLAIR contrasts synthesised from the "
                 "tissue fractions of Colin27 and the MNI152 T1 (lab.contrasts)" if config.contrasts else "")
    matrices = f"{config.size}x{config.size}" + (
        f" and {config.mixed_size}x{config.mixed_size} ({config.mixed_fraction:.0%} of batches)"
        if config.mixed_size else "")
    training = {"method": config.method, "data": f"lab.images split 'train' (Colin27 T1, BrainWeb T1 and PD, MNI152 "
                f"T1 and T2-like{contrasts}), {matrices}, flips, rotations, fields of view 0.85-1.2x, "
                f"bias fields, through {described}", "ssim_weight": config.ssim_weight,
                "steps": state["step"], "batch_size": config.batch_size, "cpu_minutes": round(state["seconds"] / 60, 1),
                "lr": config.lr, "weight_decay": config.weight_decay, "beta_lr": config.beta_lr,
                "iterations": config.iterations, "grad_iterations": config.grad_iterations,
                "base_channels": config.base_channels, "stages": config.stages, "seed": config.seed,
                "solver": config.solver, "tolerance": config.tolerance, "lambda_passes": config.lambda_passes}
    if config.background:  # recon.background: how its weight was trained
        training["background"] = {"supervision": config.background_supervision,
                                  "pretrain_steps": config.background_pretrain, "pretrain_lr": config.background_lr,
                                  "dropout": config.background_dropout, "form": config.background_form,
                                  "step": config.background_step, "frozen": config.freeze_background}
    if config.init_network:  # the whole campaign: this run plus every run the starting network came from
        training["fine_tuned_from"] = config.init_network
        registry = WeightsRegistry(weights_dir)
        before = (registry.networks.get(config.init_network) or registry.baselines.get(config.init_network)
                  or {}).get("training") or {}
        training["total_steps"] = int(before.get("total_steps", before.get("steps", 0))) + state["step"]
        training["total_cpu_minutes"] = round(float(before.get("total_cpu_minutes", before.get("cpu_minutes", 0.0)))
                                              + state["seconds"] / 60, 1)
    if note:
        training["note"] = note
    last = state["history"][-1] if state["history"] else {}
    metrics = {"val_relative_error2": last.get("val_loss"), "val_ssim": last.get("val_ssim"),
               "final_train_relative_error2": last.get("train_loss")}
    buffer_dir = "networks" if config.method in NETWORKS else "baselines"
    (weights_dir / buffer_dir).mkdir(parents=True, exist_ok=True)
    path = weights_dir / buffer_dir / f"{name}.pt"
    if config.method in NETWORKS:
        training["dictionaries"] = ("random per batch from the manifest's split=train family"
                                    if config.method == "v3" else config.dictionary)
        sha = save_network(path, model.lambda_net, float(model.split.beta.detach()),
                           settings={"iterations": config.iterations, "size": config.size,
                                     "matrix": config.trained_matrix,
                                     "solver": config.solver, "tolerance": config.tolerance})
        entry = {"name": name, "file": f"{buffer_dir}/{name}.pt", "version": config.method, "sha256": sha,
                 "beta": round(float(model.split.beta.detach()), 4),
                 "solver": {"solver": config.solver, "iterations": int(deployed_iterations or config.val_iterations),
                            "tolerance": config.tolerance,
                            **({"lambda_passes": config.lambda_passes} if config.lambda_passes > 1 else {})},
                 "training": training, "metrics": metrics}
        default = {"network": name} if set_default else {}
        if default_dictionary:
            default["dictionary"] = default_dictionary
        update_manifest(weights_dir, "networks", entry, default=default or None)
    else:
        torch.save({"config": model.config(), "state_dict": model.state_dict()}, path)
        entry = {"name": name, "file": f"{buffer_dir}/{name}.pt", "kind": config.method,
                 "sha256": sha256_of(path), "training": training, "metrics": metrics}
        update_manifest(weights_dir, "baselines", entry)
    return entry
