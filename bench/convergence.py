"""Convergence of the CDL-Λ solvers against iterations and seconds, next to BART ``pics`` against seconds.

A realistic scan (lab.evaluation.scans.simulate_scan: a held-out person's slice, 8-coil birdcage array with
correlated channel noise, prewhitened with its noise scan, 16 calibration lines, image SNR 20) per (size, R);
ESPIRiT maps, the CG low-pass part and Λ = NET_Θ (the network named, default the shipped one) once; then FISTA and
ADMM from zero codes, recording at every iteration
  * the objective of (PR) in noise units, ½‖A(x_L + D s) − y‖² + Σ Λ(|Re s| + |Im s|), as the gap to the lowest
    value any run reached,
  * the relative change of the codes ‖s_n − s_{n−1}‖ / ‖s_n‖ (the stopping measure of FISTA),
  * SSIM / NRMSE of |x_L + D s| against the truth (lab.evaluation.protocol.score, no rescaling), at a log-spaced
    subset of iterations,
  * the wall time: maps + low-pass + network once, plus the solve's time up to that iteration (the time the
    recording itself takes is not counted).
BART: ``ecalib -m1`` + ``pics -S -l1 -r λ -i N`` for several N, seconds of the two commands, same threads.
Writes a Markdown table and a PNG figure.

    python bench/convergence.py --threads 1 [--sizes 128 256] [--network NAME] [--out docs/bench_convergence.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import publish
from cdl_lambda.lab import bart
from cdl_lambda.lab.evaluation import scans as S
from cdl_lambda.lab.evaluation.protocol import score
from cdl_lambda.lab.images import load_split
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.admm import Problem
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.solvers import fista
from cdl_lambda.recon.weights import WeightsRegistry

CASES = {128: (1, 2, 3, 4), 256: (2, 3)}
CAPS = {128: {"fista": 256, "admm": 128}, 256: {"fista": 128, "admm": 64}}
BART_ITERATIONS = (10, 20, 30, 50, 100)
SCORED = sorted({1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256})


class Recorder:
    """The callback of a solve: per iteration the relative change, time (without its own), and copies of the codes
    at the scored iterations."""

    def __init__(self):
        self.start = time.perf_counter()
        self.own = 0.0
        self.previous = None
        self.seconds, self.change, self.kept = [], [], {}

    def __call__(self, n: int, codes: torch.Tensor) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.start - self.own)
        if self.previous is not None:
            diff = (codes - self.previous).abs().pow(2).sum().sqrt()
            self.change.append(float(diff / codes.abs().pow(2).sum().sqrt().clamp_min(1e-30)))
        else:
            self.change.append(1.0)
        self.previous = codes.clone()
        if n in SCORED:
            self.kept[n] = codes.clone()
        self.own += time.perf_counter() - now


def run_case(size: int, acceleration: int, model: CDLLambda, dictionary, threads: int, bart_lambda: float) -> dict:
    magnitude = next(iter(load_split("test", (size, size)).values()))
    scan = S.simulate_scan(magnitude[len(magnitude) // 2], acceleration, 20, seed=[size, acceleration])
    start = time.perf_counter()
    maps = S.espirit_maps(scan)
    with torch.no_grad():
        s = model._scan_in_noise_units(scan.kspace[None], scan.mask, maps[None], 1.0)
        x0 = s.op.adjoint(s.y)
        x_low = model._low_pass(s, x0)
        lam = _fft.to_native(model.lambda_maps(_fft.from_native(x0), dictionary))
        residual = s.y - s.op.forward(x_low)
        d_hat = dictionary.spectra((size, size), x0.device, x0.dtype)
    setup = time.perf_counter() - start

    def image_of(codes):
        return x_low + _fft.ifft2(dictionary.synthesize_fourier(_fft.fft2(codes)))

    def objective(codes):
        r = s.op.forward(image_of(codes)) - s.y
        return float(0.5 * r.abs().pow(2).sum() + (lam * (codes.real.abs() + codes.imag.abs())).sum())

    runs = {}
    with torch.no_grad():
        for solver in ("fista", "admm"):
            recorder = Recorder()
            if solver == "admm":
                problem = Problem(d_hat, lam, s.op.adjoint(residual), normal=s.op.normal)
                recorder.start = time.perf_counter()
                model.admm(problem, CAPS[size][solver], 0.0, callback=recorder)
            else:
                step = model.step_factor / dictionary.lipschitz((size, size))
                b_hat = _fft.fft2(s.op.adjoint(residual))

                def forward_step(z):
                    z_hat = _fft.fft2(z)
                    res = s.op.normal_fourier(dictionary.synthesize_fourier(z_hat)) - b_hat
                    return _fft.ifft2(torch.addcmul(z_hat, res.unsqueeze(1), step * d_hat.conj(), value=-1))

                recorder.start = time.perf_counter()
                fista(forward_step, step * lam, torch.zeros_like(lam, dtype=x0.dtype), CAPS[size][solver],
                      callback=recorder, compiled=model.compiled)
            scored = {}
            for n, codes in recorder.kept.items():
                q = score(_fft.from_native(image_of(codes) * s.support)[0].numpy(), scan.reference)
                scored[n] = (objective(codes), q["ssim"], q["nrmse"])
            runs[solver] = {"seconds": (np.array(recorder.seconds) + setup).tolist(), "change": recorder.change,
                            "scored": scored}
    bart_points = []
    if bart.available():
        for n in BART_ITERATIONS:
            start = time.perf_counter()
            image = bart.pics_multicoil(scan.kspace.numpy(), ("-l1", "-r", str(bart_lambda), "-i", str(n)))
            seconds = time.perf_counter() - start
            q = score(image, scan.reference)
            bart_points.append((n, seconds, q["ssim"], q["nrmse"]))
    return {"size": size, "R": acceleration, "setup": setup, "runs": runs, "bart": bart_points}


def first_at(change: np.ndarray, tolerance: float) -> int | None:
    hits = np.nonzero(change <= tolerance)[0]
    return int(hits[0]) + 1 if len(hits) else None


def table(results: list[dict]) -> list[str]:
    rows = ["| size | R | solver | iterations | seconds | objective gap (rel.) | rel. change | SSIM | NRMSE |",
            "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        best = min(v[0] for run in res["runs"].values() for v in run["scored"].values())
        for solver, run in res["runs"].items():
            for n in (16, 32, 64, 128, 256):  # the scored iterations present in this run
                if n not in run["scored"]:
                    continue
                obj, ssim, nrmse = run["scored"][n]
                rows.append(f"| {res['size']}² | {res['R']} | {solver} | {n} | {run['seconds'][n - 1]:.2f} | "
                            f"{(obj - best) / best:.2e} | {run['change'][n - 1]:.1e} | {ssim:.4f} | {nrmse:.4f} |")
        for n, seconds, ssim, nrmse in res["bart"]:
            rows.append(f"| {res['size']}² | {res['R']} | BART pics -l1 -i {n} | {n} | {seconds:.2f} | | | "
                        f"{ssim:.4f} | {nrmse:.4f} |")
    return rows


def figure(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(results), 4, figsize=(16, 3.1 * len(results)), squeeze=False)
    colours = {"fista": "tab:blue", "admm": "tab:red"}
    for row, res in zip(axes, results):
        best = min(v[0] for run in res["runs"].values() for v in run["scored"].values())
        for solver, run in res["runs"].items():
            n = sorted(run["scored"])
            gap = [max((run["scored"][k][0] - best) / best, 1e-7) for k in n]
            row[0].loglog(n, gap, "o-", color=colours[solver], label=solver)
            row[1].semilogy(np.arange(1, len(run["change"]) + 1), run["change"], color=colours[solver], label=solver)
            secs = [run["seconds"][k - 1] for k in n]
            row[2].plot(secs, [run["scored"][k][1] for k in n], "o-", color=colours[solver], label=solver)
            row[3].plot(secs, [run["scored"][k][2] for k in n], "o-", color=colours[solver], label=solver)
        if res["bart"]:
            b = np.array(res["bart"])
            row[2].plot(b[:, 1], b[:, 2], "s--", color="k", label="BART ecalib+pics -l1")
            row[3].plot(b[:, 1], b[:, 3], "s--", color="k", label="BART ecalib+pics -l1")
        title = f"{res['size']}², R = {res['R']}"
        row[0].set(title=f"{title}: objective gap", xlabel="iteration")
        row[1].set(title=f"{title}: relative change of the codes", xlabel="iteration")
        row[2].set(title=f"{title}: SSIM", xlabel="seconds")
        row[3].set(title=f"{title}: NRMSE", xlabel="seconds")
        for ax in row:
            ax.grid(alpha=0.3)
        row[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--network", default=None, help="Λ network (default: the manifest's default)")
    parser.add_argument("--bart-l1", type=float, default=0.01, help="λ of pics -l1")
    parser.add_argument("--out", default="docs/bench_convergence.md")
    parser.add_argument("--figure", default="docs/figures/convergence.png")
    parser.add_argument("--cache", default="runs/convergence.json", help="measured cases, kept between calls")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    registry = WeightsRegistry()
    loaded = registry.network(args.network)
    dictionary = registry.dictionary()
    model = CDLLambda(loaded.network, beta=loaded.beta).eval()
    cache = Path(args.cache)
    done = json.loads(cache.read_text()) if cache.exists() else {}
    results = []
    for size in args.sizes:
        for acceleration in CASES[size]:
            key = f"{loaded.name}|{size}|{acceleration}"
            if key not in done:  # each case is kept as soon as it is measured: a later failure loses nothing
                done[key] = run_case(size, acceleration, model, dictionary, args.threads, args.bart_l1)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(done))
            result = json.loads(json.dumps(done[key]))  # a copy: the cache keeps plain lists
            for run in result["runs"].values():
                run["seconds"], run["change"] = np.array(run["seconds"]), np.array(run["change"])
                run["scored"] = {int(n): v for n, v in run["scored"].items()}
            results.append(result)
            print(f"done {size}² R={acceleration}", file=sys.stderr, flush=True)
    figure(results, Path(args.figure))
    stops = ["| size | R | FISTA: first iteration with rel. change ≤ 1e-2 / 3e-3 | ADMM: ≤ 1e-2 / 3e-3 |",
             "|---|---|---|---|"]
    for res in results:
        cells = [" / ".join(str(first_at(res["runs"][s]["change"], t) or "—") for t in (1e-2, 3e-3))
                 for s in ("fista", "admm")]
        stops.append(f"| {res['size']}² | {res['R']} | {cells[0]} | {cells[1]} |")
    load = os.getloadavg()[0]
    text = "\n".join([
        "# Solver convergence: FISTA and ADMM against iterations and seconds, and BART",
        "",
        f"`python bench/convergence.py --threads {args.threads} --sizes {' '.join(map(str, args.sizes))}"
        f"{' --network ' + args.network if args.network else ''}` on {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s) for torch and BART alike, torch {torch.__version__}; network "
        f"{loaded.name}, dictionary {dictionary.name}; load average {load:.1f} at the end (a shared, loaded "
        "machine: compare times within one row, not across runs).",
        "",
        "Seconds = ESPIRiT maps + CG low-pass + NET_Θ once (CDL-Λ), plus the solve up to that iteration; for BART, "
        "`ecalib -m1` + `pics -S -l1 -r λ -i N`. Objective gap relative to the lowest objective any run reached.",
        "",
        *table(results),
        "",
        "Where the relative change of the codes ‖s_n − s_{n−1}‖/‖s_n‖ first falls below the tolerance:",
        "",
        *stops,
        "",
        f"![convergence]({Path(args.figure).relative_to(Path(args.out).parent).as_posix()})",
        "",
    ])
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
