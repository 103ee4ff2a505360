"""The Siemens OpenRecon image label, generated from the package, and the run-time parameters it declares.

An OpenRecon image carries the label ``com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0`` whose
value is the base64 of a JSON document (schema: ``docker/openrecon/OpenReconSchema_1.1.0.json``). Its
``parameters`` (at most 14) are shown on the scanner and reach the container at run time in the ISMRMRD header's
``userParameters`` (:mod:`gadgets.mrd_server_connection` reads them back through :func:`settings_from_values`).

Parameter ids are plain alphanumerics (the schema's pattern), each mapped to one gadget property of
:class:`gadgets.settings.Parameters`. The scanner always sends every parameter, so a value that would override the
chosen chain carries a "the chain's setting" sentinel (``chain`` for choices, 0 for the iteration cap): only
what the operator changed overrides the chain. ``output`` is not offered: the label's injector is fixed to
``image`` (magnitude), which a complex output would not match.

``python -m cdl_lambda.gadgets.openrecon_label [--gpu] [--base64] [--out FILE]`` prints or writes the label.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _datetime
import json
import sys
from pathlib import Path

LABEL_KEY = "com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0"
PORT = 9002
KEEP = "chain"  # choice value: keep the chain's setting
MAX_PARAMETERS = 14

# OpenRecon id -> gadget property (gadgets.settings.Parameters field); "config" selects the chain itself
PROPERTY_OF = {
    "dictionary": "dictionary",
    "network": "network",
    "iterations": "iterations",
    "dictionaryscale": "dictionary_scale",
    "sliceerrors": "slice_errors",
    "zerofilled": "send_zero_filled",
    "lambdamaps": "send_lambda_maps",
    "device": "device",
    "batchslices": "batch_slices",
    "calibrationindata": "calibration_in_data",
    "maxopenimages": "max_open_images",
}


def package_version() -> str:
    """The installed distribution's version, else the checkout's ``setup.cfg`` version."""
    from importlib import metadata
    try:
        return metadata.version("cdl-lambda")
    except metadata.PackageNotFoundError:
        import configparser
        config = configparser.ConfigParser()
        config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
        return config["metadata"]["version"]


def _text(value: str) -> dict:
    return {"en": value}


def _choice(pid: str, label: str, values: list[tuple[str, str]], default: str, information: str) -> dict:
    return {"id": pid, "label": _text(label), "type": "choice", "default": default,
            "values": [{"id": v, "name": _text(n)} for v, n in values], "information": _text(information)}


def _int(pid: str, label: str, minimum: int, maximum: int, default: int, information: str) -> dict:
    return {"id": pid, "label": _text(label), "type": "int", "minimum": minimum, "maximum": maximum,
            "default": default, "information": _text(information)}


def _keep_or(values: list[str]) -> list[tuple[str, str]]:
    return [(KEEP, "as the chain sets it")] + [(v, v) for v in values]


def label_parameters(chains=None, weights=None) -> list[dict]:
    """The label's ``parameters``: the chain and what a site tunes, with the shipped chains, dictionaries and
    networks as choices (``chains``: a :class:`gadgets.chains.ChainRegistry`, ``weights``: a
    :class:`recon.weights.WeightsRegistry`; default: the shipped ones)."""
    if chains is None:
        from cdl_lambda.gadgets.chains import ChainRegistry
        chains = ChainRegistry()
    if weights is None:
        from cdl_lambda.recon.weights import WeightsRegistry
        weights = WeightsRegistry()
    return [
        _choice("config", "Chain", [(name, f"{name}: {chain.description}" if chain.description else name)
                                    for name, chain in chains.chains.items()], chains.default,
                "CDL-Lambda chain (dictionary, network and settings); the options below override it"),
        _choice("dictionary", "Dictionary", _keep_or(["default"] + sorted(weights.dictionaries)), KEEP,
                "convolutional dictionary (shipped, checksummed)"),
        _choice("network", "Lambda network", _keep_or(["default"] + sorted(weights.networks) + ["none"]), KEEP,
                "network inferring the sparsity maps; none = the scalar-lambda baseline"),
        _int("iterations", "Iteration cap", 0, 1000, 0, "solver iterations; 0 = as the chain sets it"),
        _choice("dictionaryscale", "Dictionary scale", _keep_or(["auto", "1"]), KEEP,
                "auto: on a matrix larger than the network was trained at, the filters resampled to its scale; "
                "1: the filters as learned"),
        _choice("sliceerrors", "Slice error policy", _keep_or(["report", "fail"]), "report",
                "report: a failed slice comes back as a zero image marked NOT RECONSTRUCTED and the others are "
                "kept; fail: the scan ends with an error after the good images"),
        _choice("zerofilled", "Send zero-filled", _keep_or(["true", "false"]), KEEP,
                "also send the zero-filled image as its own series (DERIVED)"),
        _choice("lambdamaps", "Send Lambda maps", _keep_or(["true", "false"]), KEEP,
                "also send the sparsity maps as their own series (DERIVED)"),
        _choice("device", "Device", _keep_or(["auto", "cpu", "cuda"]), KEEP,
                "where to reconstruct; auto = the GPU when the container has one"),
        _int("batchslices", "Slices per batch", 0, 64, 0, "slices reconstructed together; 0 = automatic"),
        _choice("calibrationindata", "Calibration lines in data", _keep_or(["auto", "true", "false"]), KEEP,
                "whether calibration lines are also imaging data"),
        _int("maxopenimages", "Open images cap", 0, 100000, 0,
             "most images buffered at once before the scan is refused; 0 = as the chain sets it"),
    ]


def known_name(name: str) -> bool:
    """Whether ``name`` is one of this label's parameter ids (or the gadget property it sets)."""
    return name == "config" or name in PROPERTY_OF or name in PROPERTY_OF.values()


def settings_from_values(values: dict) -> tuple[str | None, dict]:
    """(chain name or None, ``{gadget property: value}``) from OpenRecon parameter values (strings, as they arrive
    in the header's userParameters). Values equal to the "chain's setting" sentinel are dropped; ids that are not
    this label's (a scanner sends its own user parameters too) are ignored."""
    chain = values.get("config")
    properties = {}
    for pid, prop in PROPERTY_OF.items():
        key = pid if pid in values else prop if prop in values else None  # the label's id or the property name
        if key is None:
            continue
        value = str(values[key]).strip()
        if value.lower() == KEEP or (prop in ("iterations", "max_open_images") and value in ("0", "0.0")):
            continue
        properties[prop] = value
    return (str(chain).strip() or None) if chain is not None else None, properties


def build_label(gpu: bool = False, manufacture_date: str | None = None, chains=None, weights=None) -> dict:
    """The label document. ``gpu``: the CUDA image (can use a GPU; none required)."""
    version = package_version()
    date = manufacture_date or _datetime.datetime.now(_datetime.timezone.utc).strftime("%Y/%m/%d")
    name = "CDL-Lambda"
    parameters = label_parameters(chains, weights)
    if len(parameters) > MAX_PARAMETERS:
        raise ValueError(f"{len(parameters)} OpenRecon parameters, more than the {MAX_PARAMETERS} allowed")
    return {
        "general": {
            "name": _text(name),
            "version": version,
            "vendor": "CDLLambda",
            "information": _text("Inline low-field MRI reconstruction with CDL-Lambda: learned sparsity maps for "
                                 "convolutional-dictionary reconstruction of raw k-space (research use only)"),
            "id": "cdllambda",
            "regulatory_information": {
                "device_trade_name": name,
                "production_identifier": version,
                "manufacturer_address": "",
                "made_in": "",
                "manufacture_date": date,
                "material_number": f"cdllambda_{version}",
                "gtin": "",
                "udi": "",
                "safety_advices": "Research use only; not a medical device. Images that could not be "
                                  "reconstructed are zero images whose comment reads NOT RECONSTRUCTED.",
                "special_operating_instructions": "Raw data in, magnitude images out; see the PDF.",
                "additional_relevant_information": "",
            },
        },
        "reconstruction": {
            "transfer_protocol": {"protocol": "ISMRMRD", "version": "1.4.1"},
            "port": PORT,
            "emitter": "raw",
            "injector": "image",
            "can_process_adjustment_data": False,
            "can_use_gpu": bool(gpu),
            "min_count_required_gpus": 0,
            "min_required_gpu_memory": 4096 if gpu else 0,
            "min_required_memory": 4096,  # measured peak 673 MB on a 128², 8-coil scan (docker/openrecon/README)
            "min_count_required_cpu_cores": 2,
            "content_qualification_type": "RESEARCH",
        },
        "parameters": parameters,
    }


def encode_label(label: dict) -> str:
    """The label's value: base64 of the compact JSON."""
    return base64.b64encode(json.dumps(label, separators=(",", ":")).encode()).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cdl_lambda.gadgets.openrecon_label",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the CUDA image's label (can use a GPU)")
    parser.add_argument("--base64", action="store_true", help="print the label value (base64) instead of JSON")
    parser.add_argument("--date", default=None, help="manufacture date YYYY/MM/DD (default: today, UTC)")
    parser.add_argument("--out", default=None, help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    label = build_label(gpu=args.gpu, manufacture_date=args.date)
    text = encode_label(label) if args.base64 else json.dumps(label, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
