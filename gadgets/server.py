"""The warm server: keeps torch and the reconstructors loaded (:class:`gadgets.settings.ReconstructorCache`) and
serves connection after connection, each in its own thread, for Gadgetron's ``<connect>`` node, MRD streaming
clients and the in-process replay (a socket pair, no port). A failure in one scan reaches that peer as an ERROR
message and the server goes on; a peer silent for ``idle_timeout`` seconds is dropped so it cannot hold a slot
forever; a scan that would pass the memory budget waits (:mod:`gadgets.memory_budget`). Its command line, start-up
checks and supervisor are :mod:`gadgets.serve`.
"""

from __future__ import annotations

import logging
import socket
import threading

from cdl_lambda.gadgets.chains import ChainRegistry
from cdl_lambda.gadgets.handler import CDLLambdaGadget
from cdl_lambda.gadgets import memory_budget
from cdl_lambda.gadgets.settings import ReconstructorCache
from cdl_lambda.gadgets.transport import DRAIN_SECONDS, drain_and_close
from cdl_lambda.gadgets.connection import RobustConnection
from cdl_lambda.gadgets.wire import encode_close, encode_error

log = logging.getLogger(__name__)


class Server:
    """Accept loop on ``(host, port)`` (port 0 = any free port, see :attr:`port`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 18000, cache: ReconstructorCache | None = None,
                 registry: ChainRegistry | None = None, max_concurrent: int = 2, idle_timeout: float | None = 600.0,
                 listener: socket.socket | None = None, overrides: dict | None = None, listen: bool = True,
                 connection_class=RobustConnection, budget: memory_budget.MemoryBudget | None = None):
        self.connection_class = connection_class  # MRDServerConnection: OpenRecon/FIRE conventions (--openrecon)
        self.gadget = CDLLambdaGadget(cache or ReconstructorCache(), registry, overrides)
        self.idle_timeout = idle_timeout
        self.listener, self.host, self.port = None, None, None
        if listen:  # listen=False: only serve_connection (an in-process replay over a socket pair)
            self.listener = listener or socket.create_server((host, port), reuse_port=False, backlog=16)
            self.listener.settimeout(0.5)
            self.host, self.port = self.listener.getsockname()[:2]
        self.slots = threading.Semaphore(max(1, max_concurrent))
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.served = 0
        self.budget = budget  # scans wait here when they would pass the memory limit (None: no limit)

    @property
    def cache(self) -> ReconstructorCache:
        return self.gadget.cache

    def serve_connection(self, sock: socket.socket, address=None) -> None:
        """Serve one accepted socket to its end; never raises."""
        with self.slots:
            try:
                try:
                    connection = self.connection_class(sock, idle_timeout=self.idle_timeout)
                except Exception as error:  # noqa: BLE001 - handshake failed: tell the peer
                    log.error("connection from %s: handshake failed: %s", address, error)
                    try:
                        reply = getattr(self.connection_class, "failure_reply", None)
                        sock.sendall(reply(f"handshake failed: {error}") if reply else
                                     encode_error(f"handshake failed: {error}") + encode_close())
                    except OSError:
                        pass
                    drain_and_close(sock, min(self.idle_timeout or DRAIN_SECONDS, DRAIN_SECONDS))
                    return
                log.info("connection from %s: config %r", address, connection.config_name)
                memory_budget.serve_within(self.budget, self.gadget, connection)
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
