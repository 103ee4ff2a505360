"""The ``cdl-lambda-lab`` command: ``simulate``, ``learn-dictionary``, ``train``, ``curves`` and ``evaluate``.

Each has ``add_<name>_arguments(parser)`` and ``<name>(args) -> exit status``; :data:`COMMANDS` lists them. Only
argument handling lives here; the work is done by the lab modules. The product's own command, ``cdl-lambda``
(replay, serve), knows nothing of these.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from cdl_lambda.lab import dictionary_learning, distributed, images, train as training, training_curves
from cdl_lambda.lab.acquisition import SETTINGS, Scan, Setting
from cdl_lambda.lab.evaluation import run as evaluation
from cdl_lambda.lab.mrd_writer import Protocol, count_acquisitions, write_ismrmrd
from cdl_lambda.recon.weights import default_weights_dir

log = logging.getLogger(__name__)


# ---- simulate --------------------------------------------------------------------------------------------------
def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=sorted(images.SOURCES), action="append",
                        help="image source (repeatable); default: every available source of --split")
    parser.add_argument("--split", choices=sorted(images.SPLITS), default="test", help="image split to draw from")
    parser.add_argument("--setting", choices=SETTINGS, default="lowres",
                        help="lowres: central k-space window; lines: random phase-encoding lines, multi-coil")
    parser.add_argument("--matrix", type=int, nargs="+", default=[320], help="reconstruction matrix: N or NY NX")
    parser.add_argument("--coils", type=int, default=None, help="receive channels (default 1 lowres, 8 lines)")
    parser.add_argument("--noise", type=float, default=None,
                        help="noise variance relative to k-space variance (default 0.2 lowres, 0.02 lines)")
    parser.add_argument("--correlation", type=float, default=0.3, help="neighbour-channel noise correlation")
    parser.add_argument("--window-factor", type=int, default=2, help="lowres: resolution reduction per axis")
    parser.add_argument("--acceleration", type=float, default=4.0, help="lines: undersampling factor")
    parser.add_argument("--calib-lines", type=int, default=24, help="lines: central calibration lines")
    parser.add_argument("--slices", type=int, default=4, help="slices per file, evenly spaced through the stack")
    parser.add_argument("--repetitions", type=int, default=1, help="repetitions of every slice")
    parser.add_argument("--field-strength", type=float, default=0.05, help="B0 in tesla")
    parser.add_argument("--fov", type=float, default=220.0, help="field of view in mm (square)")
    parser.add_argument("--seed", type=int, default=0, help="seed of phase, coils and noise")
    parser.add_argument("--output", type=Path, default=Path("simulated"),
                        help="output folder (one file per source) or a .h5 path for a single source")


def simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    matrix = (args.matrix[0], args.matrix[-1])
    lines = args.setting == "lines"
    setting = Setting(kind=args.setting, matrix=matrix, coils=args.coils or (8 if lines else 1),
                      noise_level=args.noise if args.noise is not None else (0.02 if lines else 0.2),
                      correlation=args.correlation, window_factor=args.window_factor,
                      acceleration=args.acceleration, calib_lines=args.calib_lines)
    protocol = Protocol(field_strength_t=args.field_strength, fov_mm=(args.fov, args.fov),
                        repetitions=args.repetitions)
    names = args.source or [n for n in images.SPLITS[args.split] if images.available(n)]
    if not names:
        log.error("no image source of split %r is installed (%s)", args.split,
                  ", ".join(f"{n}: {images.SOURCES[n].package}" for n in images.SPLITS[args.split]))
        return 1
    if args.output.suffix == ".h5" and len(names) > 1:
        log.error("--output %s names one file but %d sources were chosen", args.output, len(names))
        return 2
    jobs = []
    for name in names:
        try:
            stack = images.load_source(name, matrix, images.DEFAULT_ORIENTATIONS[args.split][:1])
        except images.SourceUnavailable as error:
            log.error("%s", error)
            return 1
        picks = np.unique(np.linspace(0, len(stack) - 1, min(args.slices, len(stack)) + 2).round().astype(int)[1:-1])
        picks = picks if len(picks) else np.arange(min(args.slices, len(stack)))
        scan = Scan(stack[picks], setting, seed=args.seed)
        path = args.output if args.output.suffix == ".h5" else \
            args.output / f"{name}_{setting.kind}_{matrix[0]}x{matrix[1]}_seed{args.seed}.h5"
        jobs.append((name, picks, scan, path))
    total = sum(count_acquisitions(scan, protocol) for _, _, scan, _ in jobs)
    with tqdm(total=total, unit="acq", desc="simulate") as bar:
        for name, picks, scan, path in jobs:
            source = images.SOURCES[name]
            write_ismrmrd(path, scan, protocol, progress=bar.update,
                          attrs={"source": name, "subject": source.subject, "split": args.split,
                                 "slice_index": picks})
            log.info("wrote %s (%d slices, %d coils)", path, scan.slices, setting.coils)
    return 0


# ---- learn-dictionary ------------------------------------------------------------------------------------------
def add_learn_dictionary_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = dictionary_learning.LearningConfig()
    parser.add_argument("--family", action="store_true", help="learn the whole shipped family into --weights-dir")
    parser.add_argument("--only", nargs="*", help="with --family: only these dictionary names")
    parser.add_argument("--weights-dir", default=None, help="weights folder (default: the shipped weights/)")
    parser.add_argument("--output", help="single dictionary: output .pt file")
    parser.add_argument("-K", "--num-filters", type=int, default=defaults.num_filters, help="number of filters K")
    parser.add_argument("--kernel-size", type=int, default=defaults.kernel_size, help="filter size k_f")
    parser.add_argument("--lambda-d", type=float, default=defaults.lambda_d,
                        help="ℓ1 weight (relative to unit-RMS high-pass)")
    parser.add_argument("--beta-d", type=float, default=defaults.beta_d, help="Tikhonov split parameter β_D")
    parser.add_argument("--steps", type=int, default=150, help="mini-batches (one filter update each)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per mini-batch")
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size, help="side of the random crops")
    parser.add_argument("--csc-iterations", type=int, default=defaults.csc_iterations,
                        help="FISTA iterations of the sparse coding step")
    parser.add_argument("--seed", type=int, default=0, help="seed of crops and initial filters")
    parser.add_argument("--device", default=None, help="cpu, cuda, or auto (default)")


def learn_dictionary(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.family:
        dictionary_learning.write_family(Path(args.weights_dir) if args.weights_dir else default_weights_dir(),
                                         args.steps, args.seed, device=args.device, only=args.only)
        return 0
    if not args.output:
        log.error("give --output FILE.pt (or --family)")
        return 2
    config = dictionary_learning.LearningConfig(args.num_filters, args.kernel_size, args.lambda_d, args.beta_d,
                                                args.steps, args.batch_size, args.patch_size, args.csc_iterations,
                                                args.seed)
    dictionary, history = dictionary_learning.learn_dictionary(config, device=args.device)
    sha = dictionary.save(args.output)
    print(f"{args.output}: objective {np.mean(history[:10]):.1f} → {np.mean(history[-10:]):.1f}, sha256 {sha}")
    return 0


# ---- train -----------------------------------------------------------------------------------------------------
TRAIN_HELP = {
    "size": "n of the n × n training images",
    "batch_size": "examples per step",
    "steps": "optimiser steps",
    "iterations": "FISTA iterations T",
    "grad_iterations": "differentiated (last) iterations T − T′",
    "base_channels": "U-Net channels of the first stage",
    "stages": "U-Net down-sampling stages",
    "data": "training scans: multicoil (as the gadget receives them) or lowres (the paper's single-coil task)",
    "upper_bound": "u_b of Λ = u_b · sigmoid(u), noise units",
    "initial_lambda": "Λ at initialisation (sets the U-Net head's bias), noise units",
    "beta": "initial β of the (PH) split",
    "cascades": "unrolled baseline: denoiser / data-consistency cascades",
    "lr": "Adam learning rate of the network",
    "weight_decay": "Adam weight decay of the network",
    "beta_lr": "Adam learning rate of the scalar parameters (β, μ)",
    "dictionary": "v1/v2: the fixed dictionary (manifest name)",
    "validate_every": "validate (and checkpoint) every this many steps",
    "validation_slices": "validation slices (half from each validation source)",
    "seed": "seed of data, initialisation and dictionary sampling",
    "time_limit_min": "stop after this many minutes (validating and checkpointing first)",
    "weights_dir": "weights folder (default: the shipped weights/)",
    "solver": "the solver trained through: admm or fista",
    "tolerance": "its stopping rule: relative change at which a slice stops (0: always run --iterations)",
    "val_iterations": "iteration cap at validation (the deployed one)",
    "init_network": "fine-tune: start from this shipped network or baseline (name in the weights manifest)",
    "checkpoint_every": "also write the checkpoint every N steps (0: only at validation)",
    "ssim_weight": "loss = relative squared error + this × (1 − SSIM)",
    "contrasts": "multicoil: also train on T1/T2/PD/FLAIR contrasts synthesised from tissue fractions",
    "mixed_size": "multicoil: also train and validate at this n × n matrix (both deployed sizes; 0: off)",
    "mixed_fraction": "share of the batches at --mixed-size",
    "background": "v3: also infer a background weight that pulls the image to zero outside the object",
    "background_supervision": "with --background: loss += this × cross-entropy of the weight against the "
                              "target's background",
    "background_pretrain": "with --background: first train the weight alone for this many steps",
    "background_lr": "learning rate of those steps",
    "background_dropout": "with --background: share of the batches solved without the weight, as a slice whose "
                          "weight the data check withdraws is",
    "context": "v3: each filter's U-Net also sees the image x0 and the filters' mean response |Dᴴx0| (still "
               "equivariant to the filter order; from --init-network without it, the network starts as that one)",
    "lambda_passes": "v3 with FISTA: split the iterations into this many passes, Λ inferred again by the network "
                     "from the image so far before each pass after the first (the codes carried on)",
    "background_form": "with --background: how the solve uses the weight: penalty (a pull to zero, the step "
                       "divided by 1 + γ_R) or factor (1 − b in the forward model, the full step)",
    "background_step": "with --background in the penalty form: FISTA's step, uniform (1 / ((1 + γ_R)‖D‖²)) or "
                       "local (per code pixel: the full step where no background is within the filters' reach; the "
                       "same minimiser)",
    "freeze_background": "with --background: keep the weight's network and gains as they start (only the Λ "
                         "network and β train), so the weight and its data check stay the starting network's",
    "background_only": "with --background and --init-network: train only the weight's network and gains (the Λ "
                       "network and β stay as they start), e.g. to fit the weight to another matrix size",
    "warmup_steps": "raise the learning rates linearly from 0 over this many steps (0: off)",
    "scan_mix": "multicoil: broad (1-16 coils, R 1-4, SNR 5-40) or site (8-16 coils, R 2-4, SNR 8-30)",
    "held_out_scans": "also score this many slices per contrast of the validation person as the product sees them "
                      "(8 coils, ESPIRiT maps, R 2-4, SNR 10 and 20, the default dictionary; at --size and "
                      "--mixed-size) at every validation, "
                      "and keep the best checkpoint by them beside --checkpoint as NAME-best.ckpt (0: off)",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = training.TrainConfig()
    parser.add_argument("--method", choices=training.METHODS, default=defaults.method, help="what to train")
    for field in dataclasses.fields(training.TrainConfig):
        if field.name == "method":
            continue
        kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
        if field.name == "time_limit_min":
            kind = float
        if str(field.type) == "bool":
            parser.add_argument("--" + field.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=getattr(defaults, field.name), help=TRAIN_HELP[field.name])
            continue
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=getattr(defaults, field.name),
                            help=TRAIN_HELP[field.name])
    parser.add_argument("--checkpoint", default="runs/train.ckpt", help="checkpoint file (written as it trains)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--export", metavar="NAME", help="after training, write the weights as NAME into the weights "
                                                         "folder and its manifest")
    parser.add_argument("--set-default", action="store_true", help="with --export: make it the default network")
    parser.add_argument("--default-dictionary", help="with --export: also make this dictionary the default")
    parser.add_argument("--note", default="", help="with --export: a note stored in the manifest entry")
    parser.add_argument("--device", default=None, help="cpu, cuda, or auto (default)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = training.TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(training.TrainConfig)})
    rank = distributed.setup()  # under torchrun: join the group (lab.distributed); else rank 0 of 1
    trainer = training.Trainer(config, device=args.device)
    checkpoint = Path(args.checkpoint)
    if args.resume and checkpoint.exists():
        trainer.load(checkpoint)
        log.info("resumed %s at step %d", checkpoint, trainer.step)
    trainer.run(checkpoint)
    distributed.teardown()
    if args.export and rank.is_main:
        weights_dir = Path(config.weights_dir) if config.weights_dir else default_weights_dir()
        entry = training.export(checkpoint, args.export, weights_dir, args.set_default, args.note,
                                args.default_dictionary)
        log.info("exported %s (sha256 %s)", entry["file"], entry["sha256"])
    return 0


# ---- curves ----------------------------------------------------------------------------------------------------
def add_curves_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="LABEL=CHECKPOINT[+MINUTES]",
                        help="training runs to draw; +MINUTES: the training its starting weights had already had")
    parser.add_argument("--output", type=Path, default=Path("runs/curves.png"), help="the figure (PNG)")


def curves(args: argparse.Namespace) -> int:
    runs = []
    for run in args.runs:
        label, _, path = run.rpartition("=")
        path, _, offset = path.partition("+")
        try:
            runs.append(training_curves.read_curve(label or Path(path).stem, path, float(offset or 0)))
        except (OSError, ValueError, KeyError) as error:
            log.error("%s: %s", run, error)
            return 2
    log.info("figure written to %s", training_curves.plot(runs, args.output))
    print(training_curves.table(runs), end="")
    return 0


# ---- evaluate --------------------------------------------------------------------------------------------------
def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    d = evaluation.Settings()
    parser.add_argument("--size", type=int, default=d.size, help="image matrix n (n × n)")
    parser.add_argument("--slices", type=int, default=d.slices, help="slices per source volume")
    parser.add_argument("--iterations", type=int, default=d.iterations, help="FISTA iterations T for every CDL method")
    parser.add_argument("--network", default=d.network, help="the V3 network (manifest name)")
    parser.add_argument("--dictionary", default=d.dictionary, help="dictionary of the scalar baseline and the figure")
    parser.add_argument("--v1-dictionary", default=d.v1_dictionary,
                        help="dictionary of the V1 network and the permutation test "
                             "(default: the one V1 was trained on)")
    parser.add_argument("--train-dictionaries", type=int, default=d.train_dictionaries,
                        help="how many training dictionaries to average (0: all)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(d.lambdas), help="scalar λ grid")
    parser.add_argument("--betas", type=float, nargs="+", default=list(d.betas), help="scalar-λ CDL β grid")
    parser.add_argument("--figure-ood", default=d.figure_ood, help="source of the out-of-distribution figure row")
    parser.add_argument("--no-bart", action="store_true", help="leave out BART pics even when it is installed")
    parser.add_argument("--no-multicoil", action="store_true", help="leave out the multi-coil section")
    parser.add_argument("--multicoil-slices", type=int, nargs=3, default=list(d.multicoil_slices),
                        metavar=("VAL", "TEST", "OOD"), help="multi-coil slices per source of each split")
    parser.add_argument("--weights-dir", default=d.weights_dir, help="weights folder (default: the shipped weights/)")
    parser.add_argument("--output-dir", default=d.output_dir,
                        help="folder of the report and its figures/ (the shipped report is docs/evaluation.md)")
    parser.add_argument("--name", default=d.name, help="report name: NAME.md and figures/NAME.png")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")


def evaluate(args: argparse.Namespace) -> int:
    command = "cdl-lambda-lab " + " ".join(sys.argv[1:]) if sys.argv[1:] else "cdl-lambda-lab evaluate"
    settings = evaluation.Settings(
        size=args.size, slices=args.slices, iterations=args.iterations, network=args.network,
        dictionary=args.dictionary, v1_dictionary=args.v1_dictionary, train_dictionaries=args.train_dictionaries,
        lambdas=tuple(args.lambdas), betas=tuple(args.betas), figure_ood=args.figure_ood, bart=not args.no_bart,
        weights_dir=args.weights_dir, output_dir=args.output_dir, name=args.name, threads=args.threads,
        multicoil=not args.no_multicoil, multicoil_slices=tuple(args.multicoil_slices), command_line=command)
    try:
        text = evaluation.run_evaluation(settings)
    except images.SourceUnavailable as error:
        log.error("%s", error)
        return 2
    log.info("report written to %s", Path(settings.output_dir) / f"{settings.name}.md")
    print(text)
    return 0


# name: (add_arguments, main, one-line help)
COMMANDS = {
    "simulate": (add_simulate_arguments, simulate,
                 "simulate low-field ISMRMRD acquisitions from MR images shipped in packages"),
    "learn-dictionary": (add_learn_dictionary_arguments, learn_dictionary, "online convolutional dictionary learning"),
    "train": (add_train_arguments, train, "train NET_Θ (V1/V2/V3) and the baselines"),
    "curves": (add_curves_arguments, curves, "validation curves of training runs: a figure and a table"),
    "evaluate": (add_evaluate_arguments, evaluate, "evaluate methods and write a Markdown report with figures"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not again where its help text already says "(default …)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdl-lambda-lab", description="CDL-Λ research: simulation, dictionary "
                                     "learning, training and evaluation", formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (to stderr)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text,
                                            formatter_class=_HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return int(COMMANDS[args.command][1](args) or 0)


if __name__ == "__main__":
    sys.exit(main())
