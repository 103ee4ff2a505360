"""Writing the replay's results safely: the output folder checked before reconstructing, the image file replaced
whole or not at all, and a full disk reported in one line.

:func:`check_output` creates and removes a probe file in the output folder before anything is reconstructed, and
creates no folder unless asked (``--mkdir``). :func:`save` builds the whole ISMRMRD file in memory
(``ismrmrd.Dataset`` on an in-memory HDF5 file), writes the bytes to a temporary file beside the output with plain
``os.write`` calls, ``fsync`` s it and renames it over the output: a full disk or any other write error raises
:class:`OutputError` with the operating system's reason, the temporary file is removed, and the previous output is
untouched (HDF5 itself never sees the failing disk, whose errors it reports as tracebacks or worse).
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from pathlib import Path

import ismrmrd

from cdl_lambda.gadgets.errors import UsageError
from cdl_lambda.gadgets.image_output import png_bytes, preview_pixels

log = logging.getLogger(__name__)
PREVIEW_NAME = re.compile(r"^image_\d+_\d+\.png$")


class OutputError(OSError):
    """The results could not be written; the message names the file and the reason. Exit status 1."""


def check_folder(folder: Path, what: str, mkdir: bool) -> None:
    """UsageError unless ``folder`` exists (or, with ``mkdir``, could be created) and a file can be created and
    removed in it."""
    if not folder.exists():
        if not mkdir:
            raise UsageError(f"{what}: the folder {folder} does not exist (create it, or add --mkdir)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"{what}: {folder} is not a folder") from None
        except OSError as error:
            raise UsageError(f"{what}: cannot create {folder}: {error.strerror or error}") from None
    if not folder.is_dir():
        raise UsageError(f"{what}: {folder} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".cdl-lambda-probe.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{what}: cannot write in {folder}: {error.strerror or error}") from None


def check_output(out: Path, mkdir: bool = False, previews: Path | None = None) -> None:
    """UsageError unless ``out`` can be written (not a folder; its folder writable, see :func:`check_folder`), and
    the previews folder's parent likewise. Checked before reconstructing so that no reconstruction is lost."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder")
    check_folder(out.parent, f"--out {out}", mkdir)
    if previews is not None and not previews.is_dir():
        check_folder(previews.parent, f"previews folder {previews}", mkdir)


def hdf5_bytes(images, group: str = "dataset") -> tuple[bytes, dict[int, int]]:
    """(the bytes of an ISMRMRD file holding ``images`` under ``<group>/image_<series>``, counts per series)."""
    buffer = io.BytesIO()
    dataset = ismrmrd.Dataset(buffer, group, mode="w")
    counts: dict[int, int] = {}
    try:
        for image in images:
            series = int(image.image_series_index)
            dataset.append_image(f"image_{series}", image)
            counts[series] = counts.get(series, 0) + 1
    finally:
        dataset.close()
    return buffer.getvalue(), counts


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(handle, view[:1 << 20]):]
    os.fsync(handle)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``; OutputError (nothing
    changed) on any failure."""
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        try:
            _write_all(handle, data)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def save(images, out: Path, group: str = "dataset", previews: Path | None = None) -> dict[int, int]:
    """Replace ``out`` with the images (counts per series returned), then the previews of the old output in
    ``previews`` (None: none) by one PNG per image; OutputError when either cannot be written."""
    data, counts = hdf5_bytes(images, group)
    replace_file(out, data)
    if previews is not None:
        write_previews(images, previews, out)
    return counts


def write_previews(images, previews: Path, out: Path) -> None:
    """Replace the previews of the old output ``out`` in ``previews`` by one 8-bit PNG per image (its first
    partition, several channels side by side: ``image_<series>_<index>.png``); OutputError when they cannot be
    written."""
    try:
        previews.mkdir(exist_ok=True)
        for old in previews.iterdir():
            if PREVIEW_NAME.match(old.name):
                old.unlink()
        for image in images:
            name = f"image_{int(image.image_series_index)}_{int(image.image_index):04d}.png"
            replace_file(previews / name, png_bytes(preview_pixels(image.data)))
    except OSError as error:
        raise OutputError(f"{out} was written, but the previews in {previews} were not: "
                          f"{error.strerror or error}") from None
    log.info("previews: %d PNG in %s", len(images), previews)
