"""``cdl-lambda serve``: the command line of the warm server (:class:`gadgets.server.Server`) for Gadgetron's
``<connect>`` node and MRD streaming clients: its arguments, start-up checks and supervisor. Binds to 127.0.0.1
unless ``--host`` says otherwise.

Start-up refuses (exit status 2, the reason on stderr) when the weights manifest or a file it lists is missing,
truncated or tampered with, or the chain registry is malformed. A native crash (segfault in a library, the kernel's
OOM killer) cannot be caught inside the process, so by default the server runs as a worker under a small
supervisor (:func:`supervise`) that owns the listening socket and restarts the worker when it dies from a signal:
the scans in flight are lost (their peers see the connection drop, never a clean end), the next connection is served
by the new worker, and connections that arrive meanwhile wait in the socket's backlog.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

from cdl_lambda.gadgets import memory_budget
from cdl_lambda.gadgets.chains import ChainRegistry
from cdl_lambda.gadgets.client import port_of
from cdl_lambda.gadgets.connection import RobustConnection
from cdl_lambda.gadgets.devices import check_available, device_argument
from cdl_lambda.gadgets.server import Server
from cdl_lambda.gadgets.settings import Parameters, parse_param_items

log = logging.getLogger(__name__)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1…65535 (0: any free port)."""
    port = port_of(text, lowest=0)
    if port is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0…65535)")
    return port


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=port_number, default=18000,
                        help="TCP port (Gadgetron itself uses 9002; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--chains", default=None, help="folder with registry.yaml (default: the shipped chains/)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="scans reconstructed at the same time")
    parser.add_argument("--preload", default=None, metavar="CHAIN",
                        help="load this chain's reconstructor before accepting connections")
    parser.add_argument("--idle-timeout", type=float, default=600.0,
                        help="drop a peer that sends nothing for this many seconds (default 600; 0 = never)")
    parser.add_argument("--device", default=None, type=device_argument, metavar="auto|cpu|cuda|cuda:N",
                        help="reconstruct on this device whatever the chain says (default: each chain's setting)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a gadget property for every scan, over the chain's (e.g. slice_errors=report on the "
                             "workers of chains/cdl_lambda_distributed.xml, whose properties Gadgetron 4.7.2 drops)")
    memory_budget.add_arguments(parser)
    parser.add_argument("--no-supervisor", action="store_true",
                        help="serve in this process (no restart after a native crash)")
    parser.add_argument("--openrecon", action="store_true",
                        help="OpenRecon/FIRE and python-ismrmrd-server clients: parameters from the header's "
                             "userParameters, failures as a logging text then a clean close")
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor


def server_parameters(items: list[str]) -> dict:
    """``{name: value}`` of ``--param NAME=VALUE`` items, checked as gadget properties (ValueError naming the bad
    one)."""
    parameters = parse_param_items(items)
    Parameters.from_sources(parameters)
    return parameters


def check_startup(chains_dir=None) -> ChainRegistry:
    """The chain registry, after every weights file the manifest lists was verified against its sha256 and every
    chain's parameters were checked; raises ValueError (WeightsError, ChainError, InputError) naming the problem."""
    from cdl_lambda.recon.weights import WeightsRegistry

    weights = WeightsRegistry()
    verified = weights.verify_all()
    log.info("weights in %s verified: %s", weights.root, ", ".join(verified) or "none listed (built-in defaults)")
    registry = ChainRegistry(chains_dir)
    for chain in registry.chains.values():
        Parameters.from_sources(chain.parameters)
    return registry


def connection_class(args):
    """The connection type ``serve`` speaks: python-ismrmrd-server's conventions with ``--openrecon``."""
    if getattr(args, "openrecon", False):
        from cdl_lambda.gadgets.mrd_server_connection import MRDServerConnection
        return MRDServerConnection
    return RobustConnection


def listen(host: str, port: int) -> socket.socket:
    """The listening socket; OSError (port taken, address not local, no permission) for the caller to report."""
    return socket.create_server((host, port), reuse_port=False, backlog=16)


def main(args) -> int:
    """Bind first (a port that is taken is reported at once, before anything is loaded), then verify the weights
    and chains, then serve. Exit status 2 with one line on stderr for anything that stops the start."""
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        try:
            listener = listen(args.host, args.port)
        except (OSError, OverflowError) as error:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, getattr(error, "strerror", None) or error)
            return 2
    overrides = {"device": args.device} if getattr(args, "device", None) else {}
    try:
        overrides = {**server_parameters(getattr(args, "param", [])), **overrides}
        if getattr(args, "device", None):
            check_available(args.device)
        budget = memory_budget.budget_from_arguments(args)
        registry = check_startup(args.chains)
        if args.preload:
            registry.check_name(args.preload)
    except ValueError as error:
        log.error("refusing to start: %s", error)
        listener.close()
        return 2
    if not args.no_supervisor and args.listen_fd is None:
        return supervise(args, listener)
    server = Server(args.host, args.port, registry=registry, max_concurrent=args.max_concurrent,
                    idle_timeout=args.idle_timeout or None, listener=listener, overrides=overrides,
                    connection_class=connection_class(args), budget=budget)
    if args.preload:
        chain = registry.select(args.preload)
        server.cache.get(Parameters.from_sources(chain.parameters, overrides))  # what its scans will ask for
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
        server.stop()
    return 0


# ------------------------------------------------------------------------------------------------- supervisor
MAX_RESTARTS = 5          # worker deaths by a signal tolerated within RESTART_WINDOW_S
RESTART_WINDOW_S = 60.0


def supervise(args, listener: socket.socket | None = None) -> int:
    """Own the listening socket, run the server in a worker process, restart the worker when a signal kills it.

    A worker that exits by itself (0 after SIGTERM/SIGINT, 2 when start-up is refused) ends the supervisor with its
    status; more than :data:`MAX_RESTARTS` deaths within :data:`RESTART_WINDOW_S` seconds end it with status 1."""
    listener = listener or listen(args.host, args.port)
    host, port = listener.getsockname()[:2]
    command = [sys.executable, "-m", "cdl_lambda.gadgets.cli"] + (["-v"] if getattr(args, "verbose", False) else []) + [
        "serve", "--listen-fd", str(listener.fileno()), "--host", host, "--port", str(port),
        "--max-concurrent", str(args.max_concurrent), "--idle-timeout", str(args.idle_timeout)]
    command += ["--chains", str(args.chains)] if args.chains else []
    command += ["--preload", args.preload] if args.preload else []
    command += ["--device", args.device] if getattr(args, "device", None) else []
    command += [f"--param={item}" for item in getattr(args, "param", [])]
    command += ["--openrecon"] if getattr(args, "openrecon", False) else []
    command += ["--memory-limit", str(args.memory_limit)] if getattr(args, "memory_limit", None) is not None else []
    deaths: list[float] = []
    worker = None
    stopping = threading.Event()

    def stop(_signum, _frame):
        stopping.set()
        if worker is not None and worker.poll() is None:
            worker.terminate()  # the worker finishes the scans in flight, then exits

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            worker = subprocess.Popen(command, pass_fds=(listener.fileno(),))
            log.info("supervisor: worker %d serving %s:%d", worker.pid, host, port)
            code = worker.wait()
            if stopping.is_set() or code >= 0:
                return 0 if stopping.is_set() else code
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            if len(deaths) > MAX_RESTARTS:
                log.error("supervisor: worker died from %s, %d times within %.0f s: giving up", name, len(deaths),
                          RESTART_WINDOW_S)
                return 1
            log.error("supervisor: worker %d died from %s (scans in flight were lost); restarting", worker.pid, name)
    finally:
        listener.close()
