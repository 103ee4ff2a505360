"""The chain registry: which reconstruction settings a connection gets, from ``chains/registry.yaml``.

Selection for a connection (config name from the peer, ISMRMRD header):

1. a config name that is exactly a chain name selects that chain;
2. else the first rule whose conditions all hold: ``config`` (glob on the config name), ``protocol_name`` and
   ``sequence_type`` (globs, case-insensitive), ``field_strength_T`` and ``matrix`` (``[min, max]``, matrix = the
   larger of the recon matrix's x and y);
3. else, when the peer sent no config name (Gadgetron's active mode sends the configuration itself), the
   ``default`` chain.

A config name that is none of these — not a chain, not matched by a ``config`` rule, not a chain file of the
registry's folder (``cdl_lambda.xml`` …) — is refused (:class:`gadgets.errors.ChainError` listing the known
chains): a misspelt name must not silently run the default chain. A known chain file name with no rule of its own
selects the header rules, then the default chain.

A chain is a name, a description and ``parameters`` (the same names as the gadget's ``<property>`` elements).
The file is read with ``yaml.safe_load``; chain names are plain words (no paths).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cdl_lambda.gadgets.errors import ChainError
from cdl_lambda.gadgets.settings import NAME_PATTERN

log = logging.getLogger(__name__)


@dataclass
class Chain:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)


def default_chains_dir() -> Path:
    """``$CDL_LAMBDA_CHAINS`` if set, else the shipped ``chains`` folder (``recon.weights.shipped_data_dir``)."""
    env = os.environ.get("CDL_LAMBDA_CHAINS")
    if env:
        return Path(env)
    from cdl_lambda.recon.weights import shipped_data_dir
    return shipped_data_dir("chains")


def _glob(pattern, value) -> bool:
    patterns = pattern if isinstance(pattern, list) else [pattern]
    text = "" if value is None else str(value).lower()
    return any(fnmatch.fnmatchcase(text, str(p).lower()) for p in patterns)


def _in_range(bounds, value) -> bool:
    if value is None:
        return False
    low, high = (list(bounds) + [None, None])[:2]
    return (low is None or float(value) >= float(low)) and (high is None or float(value) <= float(high))


def header_facts(header) -> dict:
    """The header fields rules can test: protocol_name, sequence_type, field_strength_T, matrix."""
    def get(obj, *path):
        for name in path:
            obj = getattr(obj, name, None) if obj is not None else None
        return obj

    facts = {"protocol_name": get(header, "measurementInformation", "protocolName"),
             "sequence_type": get(header, "sequenceParameters", "sequence_type"),
             "field_strength_T": get(header, "acquisitionSystemInformation", "systemFieldStrength_T"), "matrix": None}
    encodings = get(header, "encoding") or []
    size = get(encodings[0], "reconSpace", "matrixSize") if encodings else None
    if size is not None:
        facts["matrix"] = max(int(size.x or 0), int(size.y or 0))
    if isinstance(facts["sequence_type"], list):
        facts["sequence_type"] = facts["sequence_type"][0] if facts["sequence_type"] else None
    return facts


class ChainRegistry:
    """Loaded from ``registry.yaml`` in ``root`` (or from ``data``); ChainError when the file is absent: a missing
    chains folder is a broken installation or a wrong ``--chains``/``CDL_LAMBDA_CHAINS``, never silently the
    built-in chain."""

    def __init__(self, root: str | Path | None = None, data: dict | None = None):
        self.root = Path(root) if root is not None else default_chains_dir()
        if data is None:
            path = self.root / "registry.yaml"
            if path.exists():
                try:
                    data = yaml.safe_load(path.read_text())
                except yaml.YAMLError as error:
                    raise ChainError(f"chain registry {path} is not valid YAML: {error}") from None
            else:
                raise ChainError(f"no chain registry at {path}: the chains folder is missing or incomplete "
                                 "(reinstall the package, or point --chains / CDL_LAMBDA_CHAINS at a folder with "
                                 "registry.yaml)")
        if not isinstance(data, dict) or not isinstance(data.get("chains"), dict) or not data["chains"]:
            raise ChainError("chain registry must be a mapping with a non-empty 'chains' mapping")
        self.chains: dict[str, Chain] = {}
        for name, entry in data["chains"].items():
            if not NAME_PATTERN.match(str(name)):
                raise ChainError(f"chain name {name!r} is not a plain name")
            entry = entry or {}
            parameters = entry.get("parameters") or {}
            if not isinstance(parameters, dict) or any(isinstance(v, (dict, list)) for v in parameters.values()):
                raise ChainError(f"chain {name!r}: parameters must be a mapping of scalars")
            self.chains[str(name)] = Chain(str(name), str(entry.get("description", "")),
                                           {str(k): v for k, v in parameters.items()})
        self.default = str(data.get("default") or next(iter(self.chains)))
        if self.default not in self.chains:
            raise ChainError(f"default chain {self.default!r} is not defined")
        self.rules = list(data.get("rules") or [])
        for rule in self.rules:
            if not isinstance(rule, dict) or rule.get("chain") not in self.chains:
                raise ChainError(f"rule {rule!r} must name a defined chain")

    def chain_files(self) -> list[str]:
        """The chain XML files in the registry's folder and the shipped ones (names a client may send, like
        ``cdl_lambda.xml``, the name ``cdl-lambda replay`` sends by default)."""
        from cdl_lambda.recon.weights import shipped_data_dir
        names = set()
        for folder in {self.root, shipped_data_dir("chains")}:
            try:
                names.update(p.name for p in folder.glob("*.xml") if p.is_file())
            except OSError:
                pass
        return sorted(names)

    def known_names(self) -> list[str]:
        """Chain names and chain file names a config name may be."""
        return sorted(self.chains) + self.chain_files()

    def check_name(self, config_name: str | None) -> None:
        """ChainError naming the known chains when ``config_name`` is not empty and names nothing known."""
        name = (config_name or "").strip()
        if not name or name in self.chains or name in self.chain_files():
            return
        if any("config" in (rule.get("when") or {}) and _glob(rule["when"]["config"], name) for rule in self.rules):
            return
        raise ChainError(f"unknown chain {name!r}; known chains: {', '.join(sorted(self.chains))} "
                         f"(chain files: {', '.join(self.chain_files()) or 'none'})")

    def select(self, config_name: str | None, header=None) -> Chain:
        """The chain for a connection (see the module docstring); ChainError for an unknown config name."""
        name = (config_name or "").strip()
        if name in self.chains:
            return self.chains[name]
        self.check_name(name)
        facts = header_facts(header) if header is not None else {}
        for rule in self.rules:
            when = rule.get("when") or {}
            checks = []
            for key, condition in when.items():
                if key == "config":
                    checks.append(_glob(condition, name))
                elif key in ("protocol_name", "sequence_type"):
                    checks.append(_glob(condition, facts.get(key)))
                elif key in ("field_strength_T", "matrix"):
                    checks.append(_in_range(condition, facts.get(key)))
                else:
                    raise ChainError(f"rule condition {key!r} is unknown")
            if all(checks):
                log.info("chain %r chosen by rule %s", rule["chain"], when)
                return self.chains[rule["chain"]]
        if name:
            log.info("config %r matches no rule: using the default chain %r", name, self.default)
        return self.chains[self.default]
