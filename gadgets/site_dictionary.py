"""``cdl-lambda dictionary import|list``: bring a dictionary learned elsewhere into the site's weights folder.

A file holds K real k_f×k_f filters: ``.npy`` (numpy), ``.pt`` (a tensor, or a dict with ``filters``/``D``, read
with ``torch.load(weights_only=True)``) or ``.mat`` (MATLAB, the first of ``D``/``filters``/``dict`` or the only
array; read with ``scipy.io.loadmat``). Layout: ``(K, k_f, k_f)``, or ``(k_f, k_f, K)`` as SPORCO and most MATLAB code
store them (also ``(k_f, k_f, 1, K)``); decided from the shape, ``--layout`` when it cannot be (K = k_f).

Conventions (``--convention``), converted to the product's (true circular convolution, filter centre at the origin;
``recon/dictionary.py``):

- ``centred``: the product's own; kept.
- ``top-left``: a true convolution whose filter's first tap sits at the origin (SPORCO's ``cbpdn``/``ConvBPDN``
  zero-pad the filters at the top-left corner). ``Σ_j d[j] s[p − j]`` and the product's ``Σ_j d[j] s[p − j + c]``
  (c = k_f // 2) differ only by a shift of every coefficient map by c pixels, which the reconstruction solves for:
  the filters are kept as they are.
- ``correlation``: a cross-correlation (a CNN's ``conv2d``): each filter is flipped by 180°.

Each filter is then scaled to unit ℓ2 norm (a zero or non-finite filter is refused). The result is written as
``dictionaries/NAME.pt`` with its sha256 into the site weights folder (:func:`recon.weights.default_site_weights_dir`),
whose ``manifest.yaml`` lists it; the shipped manifest is never edited. ``--param dictionary=NAME`` then selects it.
"""

from __future__ import annotations

import logging
import sys
import os
from pathlib import Path

import numpy as np
import yaml

from cdl_lambda.gadgets.errors import UsageError
from cdl_lambda.gadgets.settings import NAME_PATTERN

log = logging.getLogger(__name__)
CONVENTIONS = ("centred", "top-left", "correlation")


def read_filters(path: Path) -> np.ndarray:
    """The array in ``path`` (.npy, .pt, .mat) as float64; UsageError naming what is wrong."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".pt":
            import torch
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(payload, dict):
                payload = next((payload[k] for k in ("filters", "D", "dictionary") if k in payload), None)
            if not isinstance(payload, torch.Tensor):
                raise UsageError(f"{path}: no filter tensor (a tensor, or a dict with 'filters' or 'D')")
            array = payload.detach().cpu().numpy()
        elif suffix == ".mat":
            from scipy.io import loadmat
            content = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
            key = next((k for k in ("D", "filters", "dict") if k in content), None)
            if key is None and len(content) == 1:
                key = next(iter(content))
            if key is None:
                raise UsageError(f"{path}: which array holds the filters? found {', '.join(sorted(content))}; "
                                 "name it D or filters")
            array = content[key]
        else:
            raise UsageError(f"{path}: unknown file type {suffix!r}; use .npy, .pt or .mat")
    except UsageError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise UsageError(f"{path}: cannot read it: {error}") from None
    array = np.asarray(array)
    if np.iscomplexobj(array) or not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"{path}: filters must be real numbers, got {array.dtype}")
    return array.astype(np.float64)


def to_filters(array: np.ndarray, layout: str = "auto") -> np.ndarray:
    """``(K, k_f, k_f)`` from ``(K, k_f, k_f)`` or ``(k_f, k_f, K)`` (``(k_f, k_f, 1, K)`` squeezed)."""
    if array.ndim == 4 and array.shape[2] == 1:
        array = array[:, :, 0, :]
    if array.ndim != 3:
        raise UsageError(f"filters must be a 3-D array (K, k_f, k_f) or (k_f, k_f, K), got shape {array.shape}")
    if layout == "auto":
        first, last = array.shape[0] == array.shape[1], array.shape[1] == array.shape[2]
        if first and last:
            raise UsageError(f"shape {array.shape} is (K, k_f, k_f) and (k_f, k_f, K) alike: give --layout")
        layout = "kkK" if first else "Kkk" if last else ""
        if not layout:
            raise UsageError(f"filters of shape {array.shape} are not square: need (K, k_f, k_f) or (k_f, k_f, K)")
    return np.ascontiguousarray(array.transpose(2, 0, 1) if layout == "kkK" else array)


def convert(filters: np.ndarray, convention: str) -> np.ndarray:
    """``filters`` ``(K, k_f, k_f)`` in ``convention`` → the product's convention, unit-norm (module docstring)."""
    if convention not in CONVENTIONS:
        raise UsageError(f"convention {convention!r}: use one of {', '.join(CONVENTIONS)}")
    if convention == "correlation":
        filters = filters[:, ::-1, ::-1]
    if not np.isfinite(filters).all():
        raise UsageError("filters contain NaN or Inf")
    norms = np.sqrt((filters ** 2).sum(axis=(1, 2)))
    if (norms == 0).any():
        raise UsageError(f"filter(s) {', '.join(str(i) for i in np.flatnonzero(norms == 0))} are all zeros")
    return np.ascontiguousarray(filters / norms[:, None, None])


def import_dictionary(source: Path, name: str, convention: str, layout: str = "auto", site: Path | None = None,
                      force: bool = False) -> dict:
    """Convert ``source`` and add it to the site weights folder as ``name``; returns its manifest entry."""
    import torch

    from cdl_lambda.recon.dictionary import Dictionary
    from cdl_lambda.recon.weights import WeightsRegistry, default_site_weights_dir, sha256_of_bytes
    if not NAME_PATTERN.match(name) or name == "default" or name.startswith("dct-"):
        raise UsageError(f"--name {name!r} must be a plain name (letters, digits, . _ -), not 'default' or dct-*")
    site = Path(site) if site is not None else default_site_weights_dir()
    shipped = WeightsRegistry(site=site)
    if name in shipped.dictionaries and (shipped.dictionaries[name].get("origin") != "site" or not force):
        where = "a shipped dictionary" if shipped.dictionaries[name].get("origin") != "site" else \
            "already in the site folder (--force replaces it)"
        raise UsageError(f"--name {name!r} is {where}")
    filters = convert(to_filters(read_filters(source), layout), convention)
    tensor = torch.from_numpy(filters).to(torch.float32)
    Dictionary(tensor, name=name)  # the product's own checks (shape, finite, unit norm)
    K, kf = int(tensor.shape[0]), int(tensor.shape[1])
    relative = f"dictionaries/{name}.pt"
    (site / "dictionaries").mkdir(parents=True, exist_ok=True)
    import io
    buffer = io.BytesIO()
    torch.save({"filters": tensor, "name": name, "meta": {"K": K, "kernel_size": kf}}, buffer)
    data = buffer.getvalue()
    target = site / relative
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)
    entry = {"name": name, "file": relative, "K": K, "kernel_size": kf, "imported_from": str(source.resolve()),
             "convention": convention, "sha256": sha256_of_bytes(data)}
    manifest_path = site / "manifest.yaml"
    manifest = yaml.safe_load(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest = manifest or {}
    entries = [e for e in manifest.get("dictionaries") or [] if e.get("name") != name] + [entry]
    manifest["dictionaries"] = entries
    temporary = manifest_path.with_name(".manifest.yaml.tmp")
    temporary.write_text("# the site's own dictionaries (cdl-lambda dictionary import); overlays the shipped "
                         "weights\n" + yaml.safe_dump(manifest, sort_keys=False))
    os.replace(temporary, manifest_path)
    return entry


# --------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    importer = actions.add_parser("import", help="convert a dictionary file and add it to the site weights folder")
    importer.add_argument("file", help=".npy, .pt or .mat array of K filters")
    importer.add_argument("--name", required=True, help="the name --param dictionary=NAME will use")
    importer.add_argument("--convention", choices=CONVENTIONS, default="centred",
                          help="how the filters are applied where they were learned: centred (this product's "
                               "convolution), top-left (SPORCO's), correlation (a CNN's conv2d)")
    importer.add_argument("--layout", choices=("auto", "Kkk", "kkK"), default="auto",
                          help="axis order: (K, k_f, k_f), (k_f, k_f, K) as SPORCO stores them, or auto from the "
                               "shape")
    importer.add_argument("--force", action="store_true", help="replace a site dictionary of the same name")
    actions.add_parser("list", help="the shipped and the site's dictionaries")


def main(args) -> int:
    from cdl_lambda.recon.weights import WeightsRegistry, default_site_weights_dir
    try:
        if args.action == "import":
            entry = import_dictionary(Path(args.file), args.name, args.convention, args.layout, force=args.force)
            log.info("dictionary %r (K = %d, %d×%d, %s) added to %s; use --param dictionary=%s", entry["name"],
                     entry["K"], entry["kernel_size"], entry["kernel_size"], entry["convention"],
                     default_site_weights_dir(), entry["name"])
            return 0
        if args.action == "list":
            registry = WeightsRegistry()
            default = registry.defaults.get("dictionary")
            for name, entry in sorted(registry.dictionaries.items()):
                origin = "site" if entry.get("origin") == "site" else "shipped"
                mark = " (default)" if name == default else ""
                sys.stderr.write(f"{name}\t{origin}\tK={entry.get('K', '?')}\tk_f={entry.get('kernel_size', '?')}"
                                 f"{mark}\n")
            return 0
    except ValueError as error:
        log.error("%s", error)
        return 2
    log.error("cdl-lambda dictionary: say import or list")
    return 2
