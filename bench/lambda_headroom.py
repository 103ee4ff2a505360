"""How much better could the image be with a better Λ? The solver and the model held fixed, Λ fitted to the truth.

For each evaluation scan named (lab.evaluation.scans.scans_of: the tables of docs/evaluation.md, one slice of the
split), the shipped network's image is compared with the images of the same model — the same (PH) split,
background weight b, dictionary and FISTA at the deployed cap — whose Λ is fitted to the true image by Adam on
‖|x*(Λ)| − ref‖² / ‖ref‖², differentiated through every FISTA step. Λ is given ever more freedom:

* ``gain per filter``: Λ_k = g_k · NET_Θ(x₀, D)_k (K numbers);
* ``gain map 1/f``: Λ_k = G_k ⊙ NET_Θ(x₀, D)_k with G_k = exp of a map at 1/f of the resolution, bilinearly
  upsampled (smooth corrections the network might learn to make);
* ``Λ per pixel``: every Λ_k(p) free (an oracle of where the codes may be non-zero: no network could infer it from
  the data alone, so this is a loose bound);
* ``network refitted``: NET_Θ's own weights fitted to the scan (Λ = NET_Θ(x₀, D), every weight free, from the
  shipped ones): what the architecture can express on this scan, had training found it;
* ``wider, context, refitted``: the same for a U-Net of twice the channels that also sees x₀ and the filters' mean
  response (recon.lambda_nets: ``context``), started as the shipped one computes (``UNet.load_narrower``).

These are upper bounds of what a Λ network could reach on that scan with this solver, not results: they use the
truth. They say whether a target is out of reach of the model (every row misses it) or of the network (a row that
a network could plausibly produce meets it).

    python bench/lambda_headroom.py --threads 2          (about 20 minutes on 2 cores, most of it the network columns)
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish
from cdl_lambda.lab.evaluation import mc_report, scans as S
from cdl_lambda.lab.evaluation.protocol import score
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.lambda_nets import LambdaNetV3
from cdl_lambda.recon.model import NETWORK_INPUT_SCALE, CDLLambda
from cdl_lambda.recon.weights import WeightsRegistry

SETTINGS = ("test:2:20", "test:4:20", "t2:4:10")   # split:R:SNR, the evaluation's worst-missed cells
FREEDOMS = ("gain per filter", "gain map 1/16", "gain map 1/4", "Λ per pixel", "network refitted",
            "wider, context, refitted")
NETWORK_FREEDOMS = FREEDOMS[-2:]


def network_parametrised(freedom: str, shipped, x0_centred: torch.Tensor, dictionary):
    """(parameters, Λ(parameters)) of a network freedom: a copy of the shipped Λ network, or a wider one with the
    filter context started from it; Λ in the native layout, starting where the shipped network's is."""
    if freedom == "network refitted":
        net = copy.deepcopy(shipped)
        net.background = None
    else:
        net = LambdaNetV3(2 * shipped.base_channels, shipped.stages, shipped.upper_bound, context=True)
        net.unet.load_narrower(shipped.unet.state_dict(), shipped.base_channels)
    net.requires_grad_(True)
    return list(net.parameters()), lambda: _fft.to_native(net(x0_centred * NETWORK_INPUT_SCALE, dictionary))


def parametrised(freedom: str, lam0: torch.Tensor):
    """(parameters, Λ(parameters)) of one freedom around the network's Λ₀ ``(1, K, ny, nx)`` (native layout), the
    parameters starting where Λ = Λ₀."""
    shape = tuple(lam0.shape[-2:])
    if freedom == "Λ per pixel":
        theta = torch.log(torch.expm1(lam0.clamp_min(1e-4))).clone().requires_grad_(True)
        return [theta], lambda: F.softplus(theta)
    if freedom == "gain per filter":
        theta = torch.zeros(1, lam0.shape[1], 1, 1, requires_grad=True)
        return [theta], lambda: lam0 * torch.exp(theta)
    factor = int(freedom.rsplit("/", 1)[1])
    theta = torch.zeros(1, lam0.shape[1], shape[0] // factor, shape[1] // factor, requires_grad=True)
    return [theta], lambda: lam0 * torch.exp(_fft.to_native(
        F.interpolate(theta, size=shape, mode="bilinear", align_corners=False)))


def fitted(model: CDLLambda, dictionary, scan, steps: int, lr: float, network_lr: float, freedoms=FREEDOMS) -> dict:
    """{freedom: (SSIM, NRMSE)} on ``scan``, "network" the shipped Λ; the scan's own maps, noise units."""
    maps = S.espirit_maps(scan)
    data = model._scan_in_noise_units(scan.kspace[None], scan.mask, maps[None], 1.0)
    dictionary = dictionary.resampled(model.dictionary_scale_for(tuple(scan.kspace.shape[-2:])))
    with torch.no_grad():
        x0 = data.op.adjoint(data.y)
        x0_centred = _fft.from_native(x0)
        background = model.background_terms(x0_centred)
        lam0 = _fft.to_native(model.lambda_maps(x0_centred, dictionary).to(x0.real.dtype))
        x_low = model._low_pass(data, x0, background, dictionary.scale)  # (PH) does not depend on Λ: once
    reference = torch.as_tensor(np.abs(scan.reference), dtype=torch.float32)
    cap = model.iterations

    def image(lam):
        """The shipped image for this Λ: (PR) at the cap, every step differentiated, x* = x_L + D s* as shown."""
        codes, _ = model._solve(data, x_low, lam, dictionary, cap, cap, background)
        return _fft.from_native(model._image(data, x_low, codes, dictionary, background))[0]

    def quality(lam):
        with torch.no_grad():
            q = score(image(lam).numpy(), scan.reference)
        return q["ssim"], q["nrmse"]

    results = {"network": quality(lam0)}
    for freedom in freedoms:
        if freedom in NETWORK_FREEDOMS:
            parameters, lam_of = network_parametrised(freedom, model.lambda_net, x0_centred, dictionary)
            optimiser = torch.optim.Adam(parameters, lr=network_lr)
        else:
            parameters, lam_of = parametrised(freedom, lam0)
            optimiser = torch.optim.Adam(parameters, lr=lr)
        for _ in range(steps):
            optimiser.zero_grad()
            loss = (image(lam_of()).abs() - reference).pow(2).sum() / reference.pow(2).sum()
            loss.backward()
            optimiser.step()
        results[freedom] = quality(lam_of().detach())
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="split:R:SNR (split: test, t2, val, ood)")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps per fit")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--network-lr", type=float, default=1e-3, help="Adam's rate for the network freedoms")
    parser.add_argument("--freedoms", nargs="+", default=list(FREEDOMS), choices=FREEDOMS, metavar="FREEDOM",
                        help="which columns to fit (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/bench_lambda_headroom.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = WeightsRegistry()
    loaded = registry.network()
    model = CDLLambda.deployed(loaded).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    dictionary = registry.dictionary()
    images = mc_report.load_images(128)
    rows, start = [], time.perf_counter()
    for setting in args.settings:
        split, acceleration, snr = setting.split(":")
        (scan,) = S.scans_of(images[split], split, 1, (int(acceleration),), (float(snr),))
        results = fitted(model, dictionary, scan, args.steps, args.lr, args.network_lr, args.freedoms)
        cells = " | ".join(f"{s:.3f} / {n:.3f}" for s, n in results.values())
        rows.append(f"| {split} ({scan.source}), R = {acceleration}, SNR {snr} | {cells} |")
    command = "python bench/lambda_headroom.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"# Headroom of Λ: the shipped model with Λ fitted to the truth (128², FISTA at {model.iterations} iterations)",
        "",
        f"`{command.strip()}`; network `{loaded.name}`, dictionary `{dictionary.name}`; one scan per row (the "
        f"evaluation's, `docs/evaluation.md`), SSIM / NRMSE of the magnitude, whole image. Every column but the first "
        f"fits Λ to the true image ({args.steps} Adam steps, lr {args.lr:g}, {args.network_lr:g} for a network's "
        f"weights, through every FISTA step): upper bounds, "
        f"not results (`bench/lambda_headroom.py` says what each allows). {time.perf_counter() - start:.0f} s.",
        "",
        "| scan | network | " + " | ".join(args.freedoms) + " |",
        "|---|---|" + "---|" * len(args.freedoms),
        *rows, ""])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
