"""The multi-coil evaluation's methods: each a function of a scan and its parameters, with the grid it is tuned on.

``sense1`` zero-filled SENSE-1 (Aᴴy with the product's ESPIRiT maps); ``cg_sense`` CG-SENSE with Tikhonov,
(AᴴA + λI)x = Aᴴy; ``bart_l1`` / ``bart_tv`` BART ``pics`` with ℓ1-wavelets / total variation, with BART's own
``ecalib`` maps cropped or uncropped (:data:`lab.bart.ECALIB_CROPS`, chosen per setting like λ) and
:data:`lab.bart.PICS_ITERATIONS` iterations; ``cdl_scalar`` CDL with one scalar λ (noise units) and β; the networks
(CDL-Λ and the learned baselines) through :func:`network`, which get no tuning.

A method's grid (:class:`Grid`) has numeric axes that the protocol must bracket (:mod:`lab.evaluation.protocol`)
and discrete choices it simply picks from. ``zero_filled`` of a method is its λ → 0 limit at R = 1: the
zero-filled image with the same coil maps, which the protocol checks the tuned method against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from cdl_lambda.lab import bart
from cdl_lambda.lab.evaluation.scans import Scan, espirit_maps
from cdl_lambda.recon import fft as _fft
from cdl_lambda.recon.lowpass import conjugate_gradient
from cdl_lambda.recon.model import CDLLambda
from cdl_lambda.recon.operators import MultiCoilOperator

Params = dict  # {"lam": 0.01, "maps": "cropped", ...}


@dataclass
class Grid:
    """Parameter values tried for one method: ``numeric`` axes (geometric, each with a lower bound it may reach,
    e.g. λ = 0, the unregularised limit) and ``choices`` (discrete, no bracketing)."""

    numeric: dict[str, list[float]] = field(default_factory=dict)
    lower_bounds: dict[str, float] = field(default_factory=dict)
    choices: dict[str, list] = field(default_factory=dict)

    def points(self) -> list[Params]:
        names = list(self.numeric) + list(self.choices)
        values = [self.numeric[n] for n in self.numeric] + [self.choices[n] for n in self.choices]
        return [dict(zip(names, combo)) for combo in _product(values)]


def _product(axes: list[list]) -> list[tuple]:
    out = [()]
    for axis in axes:
        out = [prefix + (v,) for prefix in out for v in axis]
    return out


@dataclass
class Method:
    """``run(scan, params) → complex image``; ``grid`` None for a method without parameters."""

    id: str
    run: Callable[[Scan, Params | None], np.ndarray]
    grid: Grid | None = None
    zero_filled: Callable[[Scan, Params | None], np.ndarray] | None = None


# ---- the product's coil maps ----------------------------------------------------------------------------------
def sense1_image(scan: Scan, _=None) -> np.ndarray:
    return MultiCoilOperator(scan.mask, espirit_maps(scan)).adjoint(scan.kspace).numpy()


def cg_sense_image(scan: Scan, params: Params, iterations: int = 30) -> np.ndarray:
    op = MultiCoilOperator(scan.mask, espirit_maps(scan))
    x0 = op.adjoint(scan.kspace)
    lam = params["lam"]
    return conjugate_gradient(lambda v: op.normal(v) + lam * v, x0[None], x0[None], iterations)[0].numpy()


def network(model, dictionary, iterations: int | None = None):
    """A method running a CDL-Λ-like ``model`` (also the learned baselines) with ``dictionary``, through the model's
    public call ``model(kspace, mask, dictionary, coil_maps=…, noise_std=…)``; ``iterations`` overrides the model's
    own cap."""
    def run(scan: Scan, _=None) -> np.ndarray:
        with torch.no_grad():
            out = model(scan.kspace[None], scan.mask, dictionary, coil_maps=espirit_maps(scan)[None], noise_std=1.0,
                        **({"iterations": iterations} if iterations and hasattr(model, "lambda_net") else {}))
        return out.image[0].numpy()
    return run


def cdl_scalar_image(dictionary, iterations: int = 64):
    def run(scan: Scan, params: Params) -> np.ndarray:
        model = CDLLambda(None, beta=params["beta"], scalar_lambda=params["lam"], iterations=iterations)
        return network(model, dictionary, iterations)(scan)
    return run


# ---- BART with its own maps -----------------------------------------------------------------------------------
def bart_maps(scan: Scan, choice: str) -> np.ndarray:
    """BART's ``ecalib`` maps of a scan for ``choice`` (a key of :data:`lab.bart.ECALIB_CROPS`), once per scan."""
    key = ("ecalib", choice)
    if key not in scan.cache:
        scan.cache[key] = bart.ecalib_maps(scan.kspace.numpy(), bart.ECALIB_CROPS[choice])
    return scan.cache[key]


def bart_zero_filled(scan: Scan, params: Params) -> np.ndarray:
    """Σ_j conj(s_j) F⁻¹ y_j with BART's maps: what ``pics`` returns at λ = 0 and R = 1."""
    maps = bart_maps(scan, params["maps"])
    return (np.conj(maps) * _fft.ifft2c(scan.kspace).numpy()).sum(axis=0)


def bart_pics(scan: Scan, params: Params, regularization: tuple[str, ...]) -> np.ndarray:
    """``pics`` with BART's maps, set to 0 outside their support: where every map is 0 no data constrain the
    image, and what pics leaves there (wavelet cycle spinning, ADMM) is not signal. This favours BART; the
    product's images are scored as they come."""
    maps = bart_maps(scan, params["maps"])
    image = bart.pics_multicoil(scan.kspace.numpy(), regularization, maps)
    return image * (np.abs(maps).sum(axis=0) > 0)


def bart_l1_image(scan: Scan, params: Params) -> np.ndarray:
    return bart_pics(scan, params, ("-l1", "-r", f"{params['lam']:g}"))


def bart_tv_image(scan: Scan, params: Params) -> np.ndarray:
    return bart_pics(scan, params, ("-R", f"T:3:0:{params['lam']:g}"))


# ---- the grids (starting points; the protocol extends them until they bracket the optimum) ----------------------
def starting_grids() -> dict[str, Grid]:
    maps = {"maps": list(bart.ECALIB_CROPS)}
    return {
        "cg_sense": Grid({"lam": [0.0, 0.01, 0.03, 0.1, 0.3]}, {"lam": 0.0}),
        "bart_l1": Grid({"lam": [0.0, 0.003, 0.01, 0.03, 0.1]}, {"lam": 0.0}, dict(maps)),
        "bart_tv": Grid({"lam": [0.0, 0.003, 0.01, 0.03, 0.1]}, {"lam": 0.0}, dict(maps)),
        "cdl_scalar": Grid({"lam": [0.5, 1.0, 2.0], "beta": [1.0, 3.0]}),
    }


def classical_methods(dictionary, with_bart: bool = True) -> dict[str, Method]:
    """The tuned classical methods (BART's only when requested and installed)."""
    grids = starting_grids()
    methods = {"cg_sense": Method("cg_sense", cg_sense_image, grids["cg_sense"], sense1_image),
               "cdl_scalar": Method("cdl_scalar", cdl_scalar_image(dictionary), grids["cdl_scalar"], sense1_image)}
    if with_bart and bart.available():
        methods["bart_l1"] = Method("bart_l1", bart_l1_image, grids["bart_l1"], bart_zero_filled)
        methods["bart_tv"] = Method("bart_tv", bart_tv_image, grids["bart_tv"], bart_zero_filled)
    return methods


SENSE1 = Method("sense1", sense1_image)
