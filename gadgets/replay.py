"""``cdl-lambda replay``: stream a recorded ISMRMRD file through the gadget, as Gadgetron would, and save the images.

The file goes over a loopback TCP connection to the same :class:`gadgets.server.Server` code a warm server runs (or
to ``--server HOST:PORT``: a running ``cdl-lambda serve`` or Gadgetron): config name (id 1), header (3),
acquisitions (1008), close (4). Returned images are written as the Gadgetron client does — ``image_<series>``
under the output file's group (default ``dataset``) — plus 8-bit PNG previews. With no input, a bundled Shepp-Logan
example (128², 4 coils, 2× oversampling, acceleration 2, noise scan) is replayed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import ismrmrd
import numpy as np

from cdl_lambda.gadgets.image_output import png_bytes
from cdl_lambda.gadgets.wire import MSG_ERROR, MSG_IMAGE, MSG_IMAGE_ARRAY, MSG_TEXT
from cdl_lambda.gadgets.client import Peer

log = logging.getLogger(__name__)
EXAMPLE = Path(__file__).resolve().parent / "examples" / "shepp_logan_128_4coils.h5"
DEFAULT_CONFIG = "cdl_lambda.xml"
CHUNK = 256


@dataclass
class ReplayResult:
    images: list = field(default_factory=list)       # ismrmrd.Image in arrival order
    arrays: list = field(default_factory=list)       # ImageArray in arrival order
    errors: list = field(default_factory=list)       # ERROR texts from the peer
    texts: list = field(default_factory=list)
    seconds: float = 0.0                              # connection to close
    first_image_seconds: float | None = None          # connection to the first image

    def series(self) -> dict[int, list]:
        groups: dict[int, list] = {}
        for image in self.images:
            groups.setdefault(int(image.image_series_index), []).append(image)
        return groups


def read_recording(path: str | Path, dataset: str = "dataset"):
    """(header XML bytes, acquisition count, iterator of acquisitions) of an ISMRMRD file; ValueError on a file that
    is missing, truncated or not ISMRMRD.

    Read with h5py in blocks of ``CHUNK`` records rather than ``ismrmrd.Dataset.read_acquisition`` one record at a
    time: a long scan streams without a Python call per HDF5 read, and a truncated file or a record whose sample
    count disagrees with its header is named (which record, what it holds) instead of failing inside the reader.
    The records are still decoded by ``ismrmrd.Acquisition`` (and files are written with ``ismrmrd.Dataset``)."""
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"cannot read {path}: not a readable HDF5 file ({error})") from None
    if dataset not in handle or "xml" not in handle[dataset]:
        handle.close()
        raise ValueError(f"{path} has no ISMRMRD dataset {dataset!r} with an XML header")
    group = handle[dataset]
    header = group["xml"][0]
    header = header.encode() if isinstance(header, str) else bytes(header)
    count = group["data"].shape[0] if "data" in group else 0

    def acquisitions():
        try:
            for start in range(0, count, CHUNK):
                try:
                    block = group["data"][start:start + CHUNK]
                except (OSError, KeyError) as error:
                    raise ValueError(f"{path}: acquisitions {start}… are unreadable (truncated file?): {error}") \
                        from None
                for record in block:
                    acq = ismrmrd.Acquisition(record["head"])
                    values = record["data"].view(np.complex64)
                    if values.size != acq.active_channels * acq.number_of_samples:
                        raise ValueError(f"{path}: acquisition {acq.scan_counter} holds {values.size} samples, its "
                                         f"header says {acq.active_channels}×{acq.number_of_samples}")
                    acq.data[:] = values.reshape(acq.active_channels, acq.number_of_samples)
                    if acq.traj.size:
                        acq.traj[:] = record["traj"].reshape(acq.number_of_samples, acq.trajectory_dimensions)
                    yield acq
        finally:
            handle.close()

    return header, count, acquisitions()


def stream(peer: Peer, header: bytes, acquisitions, config: str, parameters: dict | None = None,
           progress=None) -> ReplayResult:
    """Send config, header, acquisitions and close on ``peer`` (in a thread) while collecting the replies.
    ``config``: a chain name (id 1) or, starting with ``<``, the configuration XML itself (id 2)."""
    result = ReplayResult()
    failure: list[BaseException] = []

    def send():
        try:
            if config.lstrip().startswith("<"):
                peer.send_config_text(config)  # what Gadgetron sends an active <external> node: the XML itself
            else:
                peer.send_config_name(config)  # what a client sends Gadgetron: a chain file name
            if parameters:
                peer.send_parameters(parameters)
            peer.send_header(header)
            for acq in acquisitions:
                peer.send(acq)
                if progress is not None:
                    progress.update(1)
            peer.send_close()
        except (OSError, ValueError) as error:
            failure.append(error)
            try:
                peer.socket.socket.shutdown(1)  # SHUT_WR: let the server finish and answer
            except OSError:
                pass

    start = time.perf_counter()
    sender = threading.Thread(target=send, daemon=True, name="replay-send")
    sender.start()
    try:
        for mid, item in peer.replies():
            if mid == MSG_IMAGE:
                if result.first_image_seconds is None:
                    result.first_image_seconds = time.perf_counter() - start
                result.images.append(item)
            elif mid == MSG_IMAGE_ARRAY:
                result.arrays.append(item)
            elif mid == MSG_ERROR:
                log.error("the reconstruction reported: %s", item)
                result.errors.append(item)
            elif mid == MSG_TEXT:
                result.texts.append(item)
    except OSError as error:
        result.errors.append(f"connection lost: {error}")
    sender.join()
    peer.close()
    for error in failure:
        result.errors.insert(0, f"sending failed: {error}")
    result.seconds = time.perf_counter() - start
    return result


def replay(path: str | Path, server: str | None = None, config: str | None = None, parameters: dict | None = None,
           progress: bool = False, dataset: str = "dataset", local_server=None) -> ReplayResult:
    """Stream ``path`` through the gadget: in-process over loopback (``local_server``: a
    :class:`gadgets.server.Server` to reuse, else a fresh one) or to ``server`` ``"HOST:PORT"``."""
    header, count, acquisitions = read_recording(path, dataset)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=count, unit="acq", file=sys.stderr, desc="replay", leave=False,
                   disable=None)  # no bar when stderr is not a terminal
    own = None
    try:
        if server:
            peer = Peer.connect(*parse_address(server))
        else:
            if local_server is None:
                from cdl_lambda.gadgets.server import Server
                own = local_server = Server("127.0.0.1", 0)
                own.start(max_connections=1)
            peer = Peer.connect("127.0.0.1", local_server.port)
        try:
            if bar is None:
                return stream(peer, header, acquisitions, config or DEFAULT_CONFIG, parameters, bar)
            from tqdm.contrib.logging import logging_redirect_tqdm
            with logging_redirect_tqdm():  # log lines above the bar, the bar on its own line
                return stream(peer, header, acquisitions, config or DEFAULT_CONFIG, parameters, bar)
        except KeyboardInterrupt:
            peer.abort()
            raise
    finally:
        if bar is not None:
            bar.close()
        if own is not None:
            own.stop()


# ------------------------------------------------------------------------------------------------------ output
def write_images(result: ReplayResult, out: str | Path, group: str = "dataset") -> dict[int, int]:
    """Append images to ``out`` under ``<group>/image_<series>`` (ismrmrd.Dataset layout); returns counts."""
    counts: dict[int, int] = {}
    with ismrmrd.Dataset(str(out), group, create_if_needed=True) as target:
        for image in result.images:
            series = int(image.image_series_index)
            target.append_image(f"image_{series}", image)
            counts[series] = counts.get(series, 0) + 1
    return counts


def write_previews(result: ReplayResult, folder: str | Path) -> list[Path]:
    """One PNG per returned image (first channel, first partition): ``image_<series>_<index>.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image in result.images:
        path = folder / f"image_{int(image.image_series_index)}_{int(image.image_index):04d}.png"
        path.write_bytes(png_bytes(image.data[0, 0]))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------------- CLI
class UsageError(ValueError):
    """A command-line argument that cannot work; reported in one line with exit status 2."""


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` → (host, port); UsageError unless the port is an integer in 1…65535."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--server {text!r} must be HOST:PORT with a port in 1…65535")
    return host or "127.0.0.1", int(port)


def check_device(name: str | None) -> None:
    """UsageError when ``name`` is not auto/cpu/cuda[:N] or asks for CUDA where there is none."""
    if name in (None, "auto", "cpu"):
        return
    from cdl_lambda.recon.device import choose_device
    try:
        choose_device(name)
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--device {name!r}: {error}") from None


def check_output(out: Path) -> None:
    """UsageError unless ``out`` can be written: its folder exists (or is created) and is writable, and ``out`` is
    not a folder. Checked before reconstructing so that no reconstruction is lost to a bad path."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"--out {out}: {parent} is not a folder") from None
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create {parent}: {error.strerror or error}") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: the folder {parent} is not writable")


def check_request(args, parameters: dict) -> None:
    """Everything that can be checked before the reconstruction starts: the gadget properties (names and values),
    the server address; when reconstructing here (a remote server has its own registry, weights and devices) the
    weights folder, the chain name and the device."""
    from cdl_lambda.gadgets.settings import Parameters
    try:
        Parameters.from_sources(parameters)
    except ValueError as error:
        raise UsageError(f"--param: {error}") from None
    if args.server:
        parse_address(args.server)
    else:
        from cdl_lambda.gadgets.chains import ChainRegistry
        from cdl_lambda.recon.weights import WeightsRegistry
        try:
            WeightsRegistry()
            ChainRegistry().check_name(args.chain)
        except ValueError as error:
            raise UsageError(str(error)) from None
        check_device(parameters.get("device"))  # a remote server judges its own devices


PREVIEW_NAME = re.compile(r"^image_\d+_\d+\.png$")


def save(result: ReplayResult, out: Path, group: str, previews: Path | None) -> dict[int, int]:
    """Write the images to a temporary file beside ``out`` and rename it over ``out`` (a failure leaves the old
    output as it was); then replace the previews of the old output in ``previews`` (None: none)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    os.unlink(temporary)  # ismrmrd.Dataset creates the file itself
    try:
        counts = write_images(result, temporary, group)
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    if previews is not None:
        if previews.is_dir():
            for old in previews.iterdir():
                if PREVIEW_NAME.match(old.name):
                    old.unlink()
        log.info("previews: %d PNG in %s", len(write_previews(result, previews)), previews)
    return counts


def add_arguments(parser) -> None:
    parser.add_argument("input", nargs="?", default=None,
                        help="ISMRMRD .h5 file (default: the bundled 128² 4-coil Shepp-Logan example)")
    parser.add_argument("--out", default="out.h5",
                        help="output ISMRMRD file, replaced only once the reconstruction succeeded")
    parser.add_argument("--out-group", default="dataset", help="group for image_<series> in the output")
    parser.add_argument("--dataset", default="dataset", help="dataset group in the input file")
    parser.add_argument("--chain", default=None,
                        help=f"chain or chain file name sent to the server (default: {DEFAULT_CONFIG}, which picks "
                             "the chain by the registry's rules)")
    parser.add_argument("--server", default=None, metavar="HOST:PORT",
                        help="send to a running cdl-lambda serve or Gadgetron instead of reconstructing in-process")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                        help="where to reconstruct (default: the chain's setting, auto = CUDA when present)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="gadget property override (repeatable), sent as a JSON text message")
    parser.add_argument("--previews", default=None, help="folder for PNG previews (default: OUT stem + _previews)")
    parser.add_argument("--no-previews", action="store_true", help="do not write PNG previews")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    """Exit status 0: images written; 1: the reconstruction failed or reported errors; 2: a bad argument (nothing
    was reconstructed); 130: interrupted (Ctrl-C)."""
    try:
        return _main(args)
    except KeyboardInterrupt:
        # Threads of the in-process server may be inside torch; ending the interpreter normally would wait for
        # them (or abort in C++), so leave at once. The peer connection was reset, so a server drops the scan.
        sys.stderr.write("\ninterrupted\n")
        sys.stderr.flush()
        os._exit(130)


def _main(args) -> int:
    path = Path(args.input) if args.input else EXAMPLE
    parameters = {}
    try:
        if not path.exists():
            raise UsageError(f"input file {path} does not exist")
        for item in args.param:
            name, sep, value = item.partition("=")
            if not sep:
                raise UsageError(f"--param {item!r} is not NAME=VALUE")
            parameters[name.strip()] = value.strip()
        if args.device:
            parameters["device"] = args.device
        check_request(args, parameters)
        out = Path(args.out)
        check_output(out)
    except UsageError as error:
        log.error("%s", error)
        return 2
    try:
        result = replay(path, server=args.server, config=args.chain, parameters=parameters or None,
                        progress=not args.no_progress, dataset=args.dataset)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    for error in result.errors:
        log.error("server error: %s", error)
    if not result.images:
        log.error("%s: no images came back%s", path.name, f"; {out} was left as it was" if out.exists() else "")
        return 1
    previews = None if args.no_previews else (
        Path(args.previews) if args.previews else out.with_name(out.stem + "_previews"))
    counts = save(result, out, args.out_group, previews)
    log.info("%s: %d image(s) in %.1f s → %s %s", path.name, len(result.images), result.seconds, out,
             {f"image_{k}": v for k, v in counts.items()})
    return 1 if result.errors else 0
