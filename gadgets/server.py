"""``cdl-lambda serve``: a warm server for Gadgetron's ``<connect>`` node and MRD streaming clients.

Keeps torch and the reconstructors loaded (:class:`gadgets.handler.ReconstructorCache`) and serves connection after
connection, each in its own thread: a failure in one scan reaches that peer as an ERROR message and the server goes
on. Binds to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import logging
import socket
import threading

from gadgets.chains import ChainRegistry
from gadgets.handler import CDLLambdaGadget, ReconstructorCache
from gadgets.protocol import RobustConnection, encode_close, encode_error

log = logging.getLogger(__name__)


class Server:
    """Accept loop on ``(host, port)`` (port 0 = any free port, see :attr:`port`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 18000, cache: ReconstructorCache | None = None,
                 registry: ChainRegistry | None = None, max_concurrent: int = 2):
        self.gadget = CDLLambdaGadget(cache or ReconstructorCache(), registry)
        self.listener = socket.create_server((host, port), reuse_port=False, backlog=16)
        self.listener.settimeout(0.5)
        self.host, self.port = self.listener.getsockname()[:2]
        self.slots = threading.Semaphore(max(1, max_concurrent))
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.served = 0

    @property
    def cache(self) -> ReconstructorCache:
        return self.gadget.cache

    def serve_connection(self, sock: socket.socket, address=None) -> None:
        """Serve one accepted socket to its end; never raises."""
        with self.slots:
            try:
                try:
                    connection = RobustConnection(sock)
                except Exception as error:  # noqa: BLE001 - handshake failed: tell the peer
                    log.error("connection from %s: handshake failed: %s", address, error)
                    try:
                        sock.sendall(encode_error(f"handshake failed: {error}") + encode_close())
                    except OSError:
                        pass
                    sock.close()
                    return
                log.info("connection from %s: config %r", address, connection.config_name)
                self.gadget.handle(connection)
            finally:
                self.served += 1

    def serve_forever(self, max_connections: int | None = None) -> None:
        """Accept until :meth:`stop` (or ``max_connections`` connections were accepted)."""
        log.info("serving CDL-Λ on %s:%d", self.host, self.port)
        accepted = 0
        try:
            while not self.stopping.is_set() and (max_connections is None or accepted < max_connections):
                try:
                    sock, address = self.listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self.stopping.is_set():
                        break
                    raise
                accepted += 1
                thread = threading.Thread(target=self.serve_connection, args=(sock, address), daemon=True,
                                          name=f"scan-{accepted}")
                thread.start()
                self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        finally:
            for thread in self.threads:
                thread.join()
            self.listener.close()

    def start(self, max_connections: int | None = None) -> threading.Thread:
        """Run :meth:`serve_forever` in a background thread."""
        thread = threading.Thread(target=self.serve_forever, args=(max_connections,), daemon=True, name="server")
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=18000, help="TCP port (default 18000; Gadgetron itself uses 9002)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--chains", default=None, help="folder with registry.yaml (default: the shipped chains/)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="scans reconstructed at the same time")
    parser.add_argument("--preload", default=None, metavar="CHAIN",
                        help="load this chain's reconstructor before accepting connections")


def main(args) -> int:
    registry = ChainRegistry(args.chains)
    server = Server(args.host, args.port, registry=registry, max_concurrent=args.max_concurrent)
    if args.preload:
        from gadgets.handler import Parameters
        chain = registry.select(args.preload)
        server.cache.get(Parameters.from_sources(chain.parameters))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
        server.stop()
    return 0
