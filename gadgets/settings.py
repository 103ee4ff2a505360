"""The gadget's settings: :class:`Parameters` from the chain, the ``<property>`` elements and JSON overrides, and
the reconstructors they select, cached.

Property values arrive as strings (``<property name="iterations" value="64"/>``) and are converted and checked
here. The fields that configure the :class:`recon.pipeline.Reconstructor` carry its argument name in their
metadata (:data:`RECONSTRUCTOR`); the cache key is derived from exactly those fields.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field, fields

from cdl_lambda.gadgets.errors import InputError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # chain, dictionary and network names: no paths
RECONSTRUCTOR = "reconstructor"  # field metadata: the Reconstructor argument this setting is passed as
MIN_DICTIONARY_SCALE, MAX_DICTIONARY_SCALE = 0.5, 8.0  # resampling the filters beyond these is not meaningful


def _reconstructor(argument: str, default):
    return field(default=default, metadata={RECONSTRUCTOR: argument})


@dataclass
class Parameters:
    """Gadget settings; ``<property name=… value=…/>`` strings are converted and checked here."""

    dictionary: str = _reconstructor("dictionary", "default")
    network: str = _reconstructor("network", "default")
    iterations: int = _reconstructor("iterations", 0)  # 0: the cap the network was trained for (its manifest entry)
    dictionary_scale: str = _reconstructor("dictionary_scale", "auto")  # "auto": the network's scale; or a number
    device: str = _reconstructor("device", "auto")
    batch_slices: int = _reconstructor("batch_size", 0)  # 0 = auto: 8 on a GPU, 1 on the CPU
    output: str = "magnitude"        # "magnitude" (float32) or "complex" (complex64)
    series_index: int = 1            # zero-filled = series_index + 1, Λ maps = series_index + 2
    send_zero_filled: bool = False
    send_lambda_maps: bool = False
    max_open_images: int = 256
    calibration_in_data: str = "auto"  # "auto" (not for calibrationMode=separate), "true", "false"
    slice_errors: str = "fail"       # a slice that fails: "fail" (ERROR after the good images) or "report" (a
                                     # marked placeholder in its place; ERROR only when no image was reconstructed)

    @classmethod
    def from_sources(cls, *sources: dict) -> "Parameters":
        values = {}
        known = {f.name: f for f in fields(cls)}
        for source in sources:
            for name, raw in (source or {}).items():
                if name == "chain":
                    continue
                if name not in known:
                    raise InputError(f"unknown gadget property {name!r}; known: {', '.join(sorted(known))}")
                values[name] = cls._convert(name, known[name].type, raw)
        params = cls(**values)
        for name in ("dictionary", "network"):
            if not NAME_PATTERN.match(getattr(params, name)) or getattr(params, name).endswith(".pt"):
                raise InputError(f"property {name}={getattr(params, name)!r} must be a shipped name, not a path")
        from cdl_lambda.gadgets.devices import device_name
        params.device = device_name(params.device)
        if params.output not in ("magnitude", "complex"):
            raise InputError(f"property output={params.output!r} must be 'magnitude' or 'complex'")
        if params.slice_errors not in ("fail", "report"):
            raise InputError(f"property slice_errors={params.slice_errors!r} must be 'fail' or 'report'")
        if not 0 <= params.iterations <= 10000 or params.batch_slices < 0 or params.series_index < 0:
            raise InputError("properties iterations (0–10000; 0: the network's own), batch_slices (≥ 0), "
                             "series_index (≥ 0) out of range")
        params.dictionary_scale = _dictionary_scale(params.dictionary_scale)
        return params

    @staticmethod
    def _convert(name, kind, raw):
        text = str(raw).strip()
        try:
            if kind in ("int", int):
                return int(text)
            if kind in ("bool", bool):
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
        except ValueError:
            raise InputError(f"property {name}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
        return text

    def reconstructor_arguments(self) -> dict:
        """``{Reconstructor argument: value}`` of the fields marked :data:`RECONSTRUCTOR`."""
        return {f.metadata[RECONSTRUCTOR]: getattr(self, f.name) for f in fields(self) if RECONSTRUCTOR in f.metadata}

    @property
    def calibration_in_data_flag(self) -> bool | None:
        """``calibration_in_data`` as True/False, or None for "auto"."""
        return {"auto": None, "true": True, "false": False}.get(self.calibration_in_data.lower())


def _dictionary_scale(text) -> str | float:
    """``dictionary_scale``: "auto" (the filters seen at the scale the network was trained at, recon.model) or a
    number in [MIN_DICTIONARY_SCALE, MAX_DICTIONARY_SCALE] (1: the filters as learned)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not MIN_DICTIONARY_SCALE <= value <= MAX_DICTIONARY_SCALE:
        raise InputError(f"property dictionary_scale={text!r} must be 'auto' or a number from "
                         f"{MIN_DICTIONARY_SCALE:g} to {MAX_DICTIONARY_SCALE:g} (1: the filters as learned)")
    return value


def properties_of(config) -> dict:
    """``{name: value}`` of the ``<property>`` elements in a gadget configuration element (None → {})."""
    if config is None:
        return {}
    return {p.get("name"): p.get("value", "") for p in config.iter("property") if p.get("name")}


class ReconstructorCache:
    """Reconstructors by :meth:`Parameters.reconstructor_arguments`: loaded once, shared by connections.

    ``factory(**arguments)`` builds one (default :class:`recon.pipeline.Reconstructor`); ``loads`` counts
    constructions (a warm server's second scan must not add one)."""

    def __init__(self, factory=None):
        self._factory = factory
        self._items = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, params: Parameters):
        arguments = params.reconstructor_arguments()
        key = tuple(sorted(arguments.items()))
        with self._lock:
            if key not in self._items:
                factory = self._factory
                if factory is None:
                    from cdl_lambda.recon.pipeline import Reconstructor as factory  # noqa: N813 - torch import on first use
                start = time.perf_counter()
                self._items[key] = factory(**arguments)
                self.loads += 1
                log.info("loaded reconstructor %s in %.2f s", dict(key), time.perf_counter() - start)
            return self._items[key]


def parse_param_items(items: list[str], device: str | None = None) -> dict:
    """``{name: value}`` of command-line ``--param NAME=VALUE`` items (and ``--device`` as ``device``);
    :class:`gadgets.errors.UsageError` naming an item that is not NAME=VALUE."""
    from cdl_lambda.gadgets.errors import UsageError
    parameters = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param {item!r} is not NAME=VALUE")
        parameters[name.strip()] = value.strip()
    if device:
        parameters["device"] = device
    return parameters
