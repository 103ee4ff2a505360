"""``cdl-lambda replay``: stream a recorded ISMRMRD file through the gadget, as Gadgetron would, and save the images.

The file goes over a socket pair to the same :class:`gadgets.server.Server` connection code a warm server runs (no
port is opened), or to ``--server HOST:PORT`` (a running ``cdl-lambda serve`` or Gadgetron): config name (id 1),
header (3), acquisitions (1008), close (4). Returned images are written as the Gadgetron client does —
``image_<series>`` under the output file's group (default ``dataset``) — plus 8-bit PNG previews. With no input, a
bundled Shepp-Logan example (128², 4 coils, 2× oversampling, acceleration 2, noise scan) is replayed.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


from cdl_lambda.gadgets.devices import check_available, device_argument
from cdl_lambda.gadgets.errors import UsageError
from cdl_lambda.gadgets.output_files import OutputError, check_output, save
from cdl_lambda.gadgets.provenance import ignored_parameters
from cdl_lambda.gadgets.recording import expected_images
from cdl_lambda.gadgets.settings import parse_param_items
from cdl_lambda.gadgets.wire import MSG_ERROR, MSG_IMAGE, MSG_IMAGE_ARRAY, MSG_TEXT
from cdl_lambda.gadgets.client import Peer, port_of

log = logging.getLogger(__name__)
EXAMPLE = Path(__file__).resolve().parent / "examples" / "shepp_logan_128_4coils.h5"
DEFAULT_CONFIG = "cdl_lambda.xml"


@dataclass
class ReplayResult:
    images: list = field(default_factory=list)       # ismrmrd.Image in arrival order
    arrays: list = field(default_factory=list)       # ImageArray in arrival order
    errors: list = field(default_factory=list)       # ERROR texts from the peer
    texts: list = field(default_factory=list)
    seconds: float = 0.0                              # connection to close
    first_image_seconds: float | None = None          # connection to the first image
    header: bytes = b""                               # the ISMRMRD header sent (DICOM export reads it)

    def series(self) -> dict[int, list]:
        groups: dict[int, list] = {}
        for image in self.images:
            groups.setdefault(int(image.image_series_index), []).append(image)
        return groups


def stream(peer: Peer, header: bytes, acquisitions, config: str, parameters: dict | None = None,
           progress=None, slices_progress=None) -> ReplayResult:
    """Send config, header, acquisitions and close on ``peer`` (in a thread) while collecting the replies.
    ``config``: a chain name (id 1) or, starting with ``<``, the configuration XML itself (id 2)."""
    result = ReplayResult(header=header)
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
                if slices_progress is not None and str(item.meta.get("SeriesDescriptionAdditional", "")).startswith(
                        "CDL-Lambda"):
                    slices_progress.update(1)
            elif mid == MSG_IMAGE_ARRAY:
                result.arrays.append(item)
            elif mid == MSG_ERROR:
                log.debug("the reconstruction reported: %s", item)
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
    """Stream ``path`` through the gadget: in-process over a socket pair, through the same connection code a warm
    server runs (``local_server``: a :class:`gadgets.server.Server` whose reconstructors to reuse, else a fresh one
    that listens nowhere), or to ``server`` ``"HOST:PORT"``."""
    from cdl_lambda.gadgets.mrd2 import read_input
    header, count, acquisitions = read_input(path, dataset)  # ISMRMRD 1 HDF5, or MRD 2 (.mrd, - for stdin)
    bar = slices = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=count, unit="acq", file=sys.stderr, desc="sent", leave=False, position=0,
                   disable=None)  # no bar when stderr is not a terminal
        slices = tqdm(total=expected_images(path, dataset), unit="slice", file=sys.stderr, desc="reconstructed",
                      leave=False, position=1, disable=None)
    handler = None
    try:
        if server:
            peer = Peer.connect(*parse_address(server))
        else:  # in-process: the server's connection code on one end of a socket pair, no port opened
            if local_server is None:
                from cdl_lambda.gadgets.server import Server
                local_server = Server(listen=False)
            ours, theirs = socket.socketpair()
            handler = threading.Thread(target=local_server.serve_connection, args=(theirs, "in-process"),
                                       daemon=True, name="replay-scan")
            handler.start()
            peer = Peer(ours)
        try:
            if bar is None:
                return stream(peer, header, acquisitions, config or DEFAULT_CONFIG, parameters)
            from tqdm.contrib.logging import logging_redirect_tqdm
            with logging_redirect_tqdm():  # log lines above the bars, the bars on their own lines
                return stream(peer, header, acquisitions, config or DEFAULT_CONFIG, parameters, bar, slices)
        except KeyboardInterrupt:
            peer.abort()
            raise
    finally:
        for one in (bar, slices):
            if one is not None:
                one.close()
        if handler is not None:
            handler.join(timeout=5)


# --------------------------------------------------------------------------------------------------------- CLI
def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` → (host, port); UsageError unless the port is an integer in 1…65535."""
    host, sep, port = str(text).rpartition(":")
    number = port_of(port) if sep else None
    if number is None:
        raise UsageError(f"--server {text!r} must be HOST:PORT with a port in 1…65535")
    return host or "127.0.0.1", number


def check_weight_names(weights, parameters: dict) -> None:
    """UsageError when ``--param dictionary=`` or ``network=`` names nothing in the weights folder."""
    dictionary, network = parameters.get("dictionary"), parameters.get("network")
    if dictionary and dictionary != "default" and not dictionary.startswith("dct-") \
            and dictionary not in weights.dictionaries:
        raise UsageError(f"--param dictionary={dictionary}: unknown dictionary; known: "
                         f"{', '.join(['default', *sorted(weights.dictionaries)])}")
    if network and network not in ("default", "none") and network not in weights.networks:
        raise UsageError(f"--param network={network}: unknown network; known: "
                         f"{', '.join(['default', 'none', *sorted(weights.networks)])}")


def check_chain_file(registry, name: str | None) -> None:
    """UsageError when ``name`` is a chain file whose stream has Gadgetron C++ gadgets (``<gadget>``, e.g. the
    buffered chain's BucketToBufferGadget): in-process the gadget runs alone, so such a chain cannot be replayed
    without Gadgetron and must not quietly become the raw chain."""
    if not name or not name.endswith(".xml"):
        return
    from cdl_lambda.recon.weights import shipped_data_dir
    for folder in (registry.root, shipped_data_dir("chains")):
        path = Path(folder) / name
        if path.is_file():
            if "<gadget>" in path.read_text(errors="replace"):
                raise UsageError(f"--chain {name} runs Gadgetron's own gadgets before the CDL-Lambda one; replay it "
                                 "through Gadgetron (--server HOST:PORT), or pick a registry chain by name")
            return


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
            weights = WeightsRegistry()
            check_weight_names(weights, parameters)
            registry = ChainRegistry()
            registry.check_name(args.chain)
        except ValueError as error:
            raise UsageError(str(error)) from None
        check_chain_file(registry, args.chain)
        if parameters.get("device"):  # a remote server judges its own devices
            source = "--device" if getattr(args, "device", None) else "--param device"
            try:
                check_available(parameters["device"])
            except ValueError as error:
                raise UsageError(f"{source}: {error}") from None


def add_arguments(parser) -> None:
    parser.add_argument("input", nargs="*", default=None,
                        help="ISMRMRD .h5 file, or an MRD 2 stream (.mrd, - for stdin) (default: the bundled 128² "
                             "4-coil Shepp-Logan example); several files or folders: an archive, one process, the "
                             "model loaded once (gadgets.archive)")
    parser.add_argument("--out", default="out.h5",
                        help="output ISMRMRD file, replaced only once the reconstruction succeeded (for several "
                             "inputs: a folder, the outputs named after the inputs)")
    parser.add_argument("--out-group", default="dataset", help="group for image_<series> in the output")
    parser.add_argument("--dataset", default="dataset", help="dataset group in the input file")
    parser.add_argument("--chain", default=None,
                        help=f"chain or chain file name sent to the server (default: {DEFAULT_CONFIG}, which picks "
                             "the chain by the registry's rules)")
    parser.add_argument("--server", default=None, metavar="HOST:PORT",
                        help="send to a running cdl-lambda serve or Gadgetron instead of reconstructing in-process")
    parser.add_argument("--device", default=None, type=device_argument, metavar="auto|cpu|cuda|cuda:N",
                        help="where to reconstruct (default: the chain's setting; auto = CUDA when present)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="gadget property override (repeatable), sent as a JSON text message")
    parser.add_argument("--previews", default=None, help="folder for PNG previews (default: OUT stem + _previews)")
    parser.add_argument("--no-previews", action="store_true", help="do not write PNG previews")
    parser.add_argument("--mkdir", action="store_true", help="create the output's folder when it does not exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--mrd2", action="store_true",
                        help="write OUT as an MRD 2 stream (the default for an OUT ending in .mrd)")
    parser.add_argument("--dicom", default=None, metavar="DIR",
                        help="also write the images as DICOM, one series per image series (gadgets.dicom_export)")


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
    inputs = [args.input] if isinstance(args.input, str) else list(args.input or [])
    if len(inputs) > 1 or any(Path(p).is_dir() for p in inputs):
        from cdl_lambda.gadgets import archive
        return archive.main(args, inputs)
    path = Path(inputs[0]) if inputs else EXAMPLE
    parameters = {}
    try:
        if not path.exists() and str(path) != "-":
            raise UsageError(f"input file {path} does not exist")
        parameters = parse_param_items(args.param, args.device)
        check_request(args, parameters)
        out = Path(args.out)
        previews = None if args.no_previews else (
            Path(args.previews) if args.previews else out.with_name(out.stem + "_previews"))
        check_output(out, mkdir=getattr(args, "mkdir", False), previews=previews)
        if args.dicom:
            from cdl_lambda.gadgets.dicom_export import check_folder
            check_folder(args.dicom)
    except UsageError as error:
        log.error("%s", error)
        return 2
    try:
        result = replay(path, server=args.server, config=args.chain, parameters=parameters or None,
                        progress=not args.no_progress, dataset=args.dataset)
    except (ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    for error in result.errors:  # in-process, the gadget has logged each of its failures where it happened
        if args.server or error.startswith(("sending failed", "connection lost")):
            log.error("server error: %s", error)
    if not result.images:
        log.error("%s: no images came back%s", path.name, f"; {out} was left as it was" if out.exists() else "")
        return 1
    ignored = ignored_parameters(parameters, result.images) if parameters else {}
    if ignored:
        said = ", ".join(f"{name}={'/'.join(sorted(values))}" for name, values in sorted(ignored.items()))
        log.error("the server did not apply --param %s (the images say %s): a Gadgetron server passes the gadget only "
                  "its chain's <property> values; set them in the chain XML or registry.yaml there, or replay to a "
                  "cdl-lambda serve; %s was left as it was", ", ".join(sorted(ignored)), said, out)
        return 2
    from cdl_lambda.gadgets.mrd2 import is_mrd2_path, save_mrd2
    try:
        if args.mrd2 or (is_mrd2_path(out) and str(out) != "-"):
            counts = save_mrd2(result, out, previews)
        else:
            counts = save(result.images, out, args.out_group, previews)
    except OutputError as error:
        log.error("%s", error)
        return 1
    log.info("%s: %d image(s) in %.1f s → %s %s", path.name, len(result.images), result.seconds, out,
             {f"image_{k}": v for k, v in counts.items()})
    if args.dicom:
        from cdl_lambda.gadgets.dicom_export import export_result
        export_result(result, args.dicom)
    return 1 if result.errors else 0
