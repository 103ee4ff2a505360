"""The CDL-Λ gadget: one handler for Gadgetron's active mode, the warm server and offline replay.

Gadgetron targets (``<execute name="cdl_lambda.gadgets.handler" target=… type="python"/>``):

- ``CDLLambdaGadget`` — raw acquisitions in (1008), ``ismrmrd.Image`` s out (1022); also accepts ReconData (1023) from
  ``BucketToBufferGadget`` and answers it with an ImageArray (1024, complex64);
- ``cdl_lambda`` — the same as a function target.

Per connection the gadget only composes: chain (:mod:`gadgets.chains`) + ``<property>`` elements + JSON text →
:class:`gadgets.settings.Parameters` → a cached :class:`recon.pipeline.Reconstructor` → a
:class:`gadgets.scan.ScanSession` fed with the connection's items. A slice that fails is reported and the others
still come back; a slice that fails on the GPU is redone on the CPU and its image comment says so. With
``slice_errors=fail`` (the default, for MRD clients that keep what they received) any failure ends with an ERROR
message (id 8) after the good images; with ``slice_errors=report`` (the shipped Gadgetron chains: Gadgetron aborts
the stream on an ERROR and would drop the good images) a failed slice is sent as a placeholder marked NOT
RECONSTRUCTED and the scan ends normally, unless no image at all was reconstructed: then ERROR. Never a silent clean
close.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from cdl_lambda.gadgets.chains import ChainRegistry
from cdl_lambda.gadgets.connection import RobustConnection
from cdl_lambda.gadgets.scan import ScanSession
from cdl_lambda.gadgets.settings import Parameters, ReconstructorCache, properties_of

log = logging.getLogger(__name__)

_DEFAULT_CACHE = ReconstructorCache()


class CDLLambdaGadget:
    """The Gadgetron target. ``handle(connection)`` serves one connection: a gadgetron ``Connection`` (active mode,
    already past the handshake) or a :class:`RobustConnection` (server, replay)."""

    def __init__(self, cache: ReconstructorCache | None = None, registry: ChainRegistry | None = None,
                 overrides: dict | None = None):
        self.cache = cache or _DEFAULT_CACHE
        self.registry = registry
        self.overrides = dict(overrides or {})  # settings that win over every source (``serve --device``)

    def handle(self, connection) -> int:
        """Serve ``connection`` to its end; returns the number of items sent. Never raises."""
        original = connection
        connection = RobustConnection.adopt(connection) if not isinstance(connection, RobustConnection) else connection
        sent, scan = 0, None
        try:
            registry = self.registry or ChainRegistry()
            chain = registry.select(connection.config_name, connection.header)
            params = Parameters.from_sources(chain.parameters, properties_of(connection.config), connection.parameters,
                                             self.overrides)
            log.info("chain %r: %s", chain.name, params)
            requested = params
            reconstructor = self.cache.get(requested)
            if not params.iterations and getattr(reconstructor, "iterations", None):
                params = replace(params, iterations=reconstructor.iterations)  # 0: the network's own cap, by number
            scan = ScanSession(connection.header, params, reconstructor, chain.name, connection.send,
                               cpu_fallback=lambda: self.cache.get(replace(requested, device="cpu")),
                               peer_gone=connection.peer_gone)
            start = time.perf_counter()
            for item in connection:
                scan.on_item(item)
                if scan.abandoned:  # the peer has gone: what it sent after this reaches no one (and a reset
                    break           # connection reads as a message cut short)
            scan.finish(complete=getattr(connection, "ended_with_close", True))
            sent = scan.sent
            log.info("scan done: %d item(s) sent in %.2f s", sent, time.perf_counter() - start)
            if scan.abandoned:
                log.warning("the peer went away: %d slice(s) were not reconstructed", scan.abandoned)
                connection.close()
            elif scan.failures and params.slice_errors == "report" and scan.reconstructed:
                log.error("%d problem(s), reported in the images marked NOT RECONSTRUCTED (slice_errors=report): %s",
                          len(scan.failures), " | ".join(scan.failures[:20]))
                connection.close()
            elif scan.failures:
                connection.fail(f"{len(scan.failures)} problem(s); {sent} image(s) were sent, "
                                f"{scan.reconstructed} image(s) reconstructed. "
                                + " | ".join(scan.failures[:20]))
            else:
                connection.close()
        except Exception as error:  # noqa: BLE001 - everything must reach the peer as an ERROR message
            log.error("CDL-Λ gadget failed: %s: %s", type(error).__name__, error)
            log.debug("traceback of the failure", exc_info=True)
            progress = "" if scan is None else (f"; {scan.sent} image(s) had been sent, images still open were not "
                                                "reconstructed" + "".join(f" | {f}" for f in scan.failures[:20]))
            connection.fail(f"CDL-Lambda gadget failed: {type(error).__name__}: {error}{progress}")
            sent = 0 if scan is None else scan.sent
        finally:
            if original is not connection:
                original.socket = _Closed()
        return sent


class _Closed:
    """Stands in for gadgetron's socket wrapper after we closed the socket (its exit would send CLOSE again)."""

    def close(self):
        pass


def cdl_lambda(connection) -> None:
    """Function target for ``<execute name="cdl_lambda.gadgets.handler" target="cdl_lambda" type="python"/>``."""
    CDLLambdaGadget().handle(connection)
