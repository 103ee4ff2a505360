"""What every image says about how it was made: the software version and the gadget parameters used.

``CDL_SoftwareVersion`` is the installed package's version (``importlib.metadata``), or, in a checkout that was
never installed, the ``version`` of its ``setup.cfg``. ``CDL_Parameters`` lists every gadget parameter of the scan
as ``name=value`` pairs joined by ``"; "``, in the order of :class:`gadgets.settings.Parameters`; a client reads it
back with :func:`parse_parameters` to see whether what it asked for was applied (a Gadgetron server passes the
gadget only its chain's ``<property>`` values, never a client's text message).
"""

from __future__ import annotations

import configparser
import functools
from dataclasses import fields
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "cdl-lambda"


@functools.lru_cache(maxsize=1)
def software_version() -> str:
    """The package version: installed metadata, else the checkout's setup.cfg, else "unknown"."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    return config.get("metadata", "version", fallback="unknown")


def parameters_text(params) -> str:
    """``"dictionary=default; network=default; iterations=64; …"`` of a :class:`gadgets.settings.Parameters`."""
    return "; ".join(f"{f.name}={_text(getattr(params, f.name))}" for f in fields(params))


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_parameters(text: str) -> dict[str, str]:
    """The inverse of :func:`parameters_text`: ``{name: value}`` as strings."""
    pairs = (item.partition("=") for item in str(text or "").split(";"))
    return {name.strip(): value.strip() for name, sep, value in pairs if sep}


def ignored_parameters(requested: dict, images) -> dict[str, set]:
    """``{name: {values the images say}}`` for each requested parameter some returned image was not made with
    (images without ``CDL_Parameters`` are not ours and are skipped). Values compare as the gadget converts them."""
    from cdl_lambda.gadgets.settings import Parameters
    wanted = parameters_text(Parameters.from_sources(requested))
    wanted = {name: value for name, value in parse_parameters(wanted).items() if name in requested}
    found: dict[str, set] = {}
    for image in images:
        said = image.meta.get("CDL_Parameters") if hasattr(image, "meta") else None
        if not said:
            continue
        used = parse_parameters(said)
        for name, value in wanted.items():
            if used.get(name) != value:
                found.setdefault(name, set()).add(used.get(name, "absent"))
    return found
