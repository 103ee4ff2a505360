"""One check for a device name, wherever it comes from (``--device`` of replay and serve, the ``device=`` gadget
property): ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; and whether this machine has
it. Messages name the choices, never torch's list of device types."""

from __future__ import annotations

import argparse
import re

from cdl_lambda.gadgets.errors import InputError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d{1,3})?)$")
CHOICES = "auto, cpu, cuda or cuda:N"


def device_name(text) -> str:
    """``text`` normalised (lower case, stripped); InputError unless it is auto, cpu, cuda or cuda:N."""
    name = str(text).strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise InputError(f"device {str(text)!r} is not a device: use {CHOICES}")
    return name


def check_available(name: str) -> None:
    """InputError when ``name`` (a :func:`device_name`) asks for a CUDA device this machine does not have."""
    name = device_name(name)
    if not name.startswith("cuda"):
        return
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise InputError(f"device {name!r}: this machine has no CUDA GPU that torch can use (use cpu or auto)")
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise InputError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0…cuda:{count - 1}")


def device_argument(text: str) -> str:
    """An argparse type for ``--device``: the checked name (availability is checked before the work starts)."""
    try:
        return device_name(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
