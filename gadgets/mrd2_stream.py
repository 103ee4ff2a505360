"""``cdl-lambda stream``: an MRD 2 stream on stdin → CDL-Λ → images as an MRD 2 stream on stdout, logs on stderr:
a node for a Unix pipe of MRD 2 streams (as Pingvin chains reconstructions)::

    python -m mrd.tools.phantom -m 128 -c 8 | cdl-lambda stream | python -m mrd.tools.export_png_images -o img_

The input header goes out unchanged, then each image as soon as it is reconstructed. Inside, the stream runs over
loopback through the same server, gadget and chain selection as ``replay`` and ``serve`` (acquisitions converted by
:mod:`gadgets.mrd2`). stdout carries only the MRD 2 stream: the process's file descriptor 1 is pointed at stderr
before anything is loaded, so nothing a library prints can corrupt the stream.

Exit status: 0 images written; 1 the reconstruction reported errors (the images that came are written and the
stream is closed properly); 2 a bad argument or an input that is not an MRD 2 stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 30  # how long the stream waits, after its last image, for the reconstruction thread to end


def add_arguments(parser) -> None:
    parser.add_argument("--chain", default=None, help="chain name (default: chosen by the registry from the header)")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="where to reconstruct")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="gadget property override (repeatable)")
    parser.add_argument("--input", default="-", help="MRD 2 stream to read (default: stdin)")


def _protected_stdout():
    """A binary stream on the original stdout; fd 1 (and ``sys.stdout``) then point at stderr."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def main(args) -> int:
    import mrd

    from cdl_lambda.gadgets import mrd2
    from cdl_lambda.gadgets.client import Peer
    from cdl_lambda.gadgets.replay import DEFAULT_CONFIG, check_request
    from cdl_lambda.gadgets.settings import parse_param_items
    from cdl_lambda.gadgets.wire import MSG_ERROR, MSG_IMAGE

    output = _protected_stdout()
    parameters = {}
    try:
        parameters = parse_param_items(args.param, args.device)
        check_request(argparse.Namespace(server=None, chain=args.chain), parameters)
        opened = mrd2.open_mrd2(args.input)
        header_xml, _, acquisitions = mrd2.read_mrd2(args.input, opened)
    except ValueError as error:
        log.error("%s", error)
        return 2

    from cdl_lambda.gadgets.server import Server
    server = Server("127.0.0.1", 0)
    serving = server.start(max_connections=1)
    peer = Peer.connect("127.0.0.1", server.port)
    failures: list[str] = []

    def send():
        try:
            peer.send_config_name(args.chain or DEFAULT_CONFIG)
            if parameters:
                peer.send_parameters(parameters)
            peer.send_header(header_xml)
            for acquisition in acquisitions:
                peer.send(acquisition)
            peer.send_close()
        except (OSError, ValueError) as error:
            failures.append(f"reading or sending the input failed: {error}")
            try:
                peer.socket.socket.shutdown(1)
            except OSError:
                pass

    sender = threading.Thread(target=send, daemon=True, name="stream-send")
    sender.start()
    count = 0
    with mrd.BinaryMrdWriter(output) as writer:
        writer.write_header(opened[1])
        try:
            for mid, item in peer.replies():
                if mid == MSG_IMAGE:
                    writer.write_data([mrd2.stream_item(mrd2.image_from_ismrmrd(item))])
                    output.flush()
                    count += 1
                elif mid == MSG_ERROR:
                    log.error("the reconstruction reported: %s", item)
                    failures.append(item)
        except OSError as error:
            failures.append(f"connection lost: {error}")
        except Exception as error:  # noqa: BLE001 - the stream must still be closed properly for the next node
            log.exception("writing the images failed")
            failures.append(f"writing the images failed: {type(error).__name__}: {error}")
            peer.abort()
        sender.join()
        peer.close()
        server.stop()
    # the scan's thread may still be tidying up after its last reply: let it end before the interpreter does, so no
    # native code runs while the process tears its libraries down
    serving.join(timeout=SHUTDOWN_SECONDS)
    if serving.is_alive():
        log.warning("the reconstruction thread did not end within %d s of the stream's end", SHUTDOWN_SECONDS)
    output.close()
    log.info("%d image(s) written to stdout", count)
    return 1 if failures or not count else 0
