"""The CDL-Λ gadget: one handler for Gadgetron's active mode, the warm server and offline replay.

Gadgetron targets (``<execute name="gadgets.handler" target=… type="python"/>``):

- ``CDLLambdaGadget`` — raw acquisitions in (1008), ``ismrmrd.Image`` s out (1022); also accepts ReconData (1023) from
  ``BucketToBufferGadget`` and answers it with an ImageArray (1024, complex64);
- ``cdl_lambda`` — the same as a function target.

Flow per connection: chain (registry + ``<property>`` elements + JSON text) → parameters → a cached
:class:`recon.pipeline.Reconstructor` → buffer (noise, calibration, groups) → prepare (prewhiten, oversampling,
k2) → coil maps + CDL-Λ, slices batched → images. A slice that fails is reported and the others still come back;
a slice that fails on the GPU (out of memory, a CUDA error) is redone on the CPU and its image comment says so;
any failure ends with an ERROR message (id 8) after the good images, never a silent clean close.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, fields, replace

import ismrmrd
import numpy as np
import torch

from gadgets import images as _images
from gadgets.buffer import AcquisitionBuffer, InputError, read_encoding
from gadgets.chains import ChainRegistry
from gadgets.prepare import SliceInput, prepare_group, whitening_matrix
from gadgets.wire import ImageArray, ReconData
from gadgets.connection import RobustConnection

log = logging.getLogger(__name__)
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ------------------------------------------------------------------------------------------------ parameters
@dataclass
class Parameters:
    """Gadget settings; ``<property name=… value=…/>`` strings are converted and checked here."""

    dictionary: str = "default"
    network: str = "default"
    iterations: int = 64
    device: str = "auto"
    batch_slices: int = 0            # 0 = auto: 8 on a GPU, 1 on the CPU
    output: str = "magnitude"        # "magnitude" (float32) or "complex" (complex64)
    series_index: int = 1            # zero-filled = series_index + 1, Λ maps = series_index + 2
    send_zero_filled: bool = False
    send_lambda_maps: bool = False
    max_open_images: int = 256
    calibration_in_data: str = "auto"  # "auto" (not for calibrationMode=separate), "true", "false"

    @classmethod
    def from_sources(cls, *sources: dict) -> "Parameters":
        values = {}
        known = {f.name: f for f in fields(cls)}
        for source in sources:
            for name, raw in (source or {}).items():
                if name == "chain":
                    continue
                if name not in known:
                    log.warning("unknown gadget property %r ignored", name)
                    continue
                values[name] = cls._convert(name, known[name].type, raw)
        params = cls(**values)
        for name in ("dictionary", "network"):
            if not _PLAIN_NAME.match(getattr(params, name)) or getattr(params, name).endswith(".pt"):
                raise InputError(f"property {name}={getattr(params, name)!r} must be a shipped name, not a path")
        if params.output not in ("magnitude", "complex"):
            raise InputError(f"property output={params.output!r} must be 'magnitude' or 'complex'")
        if not 1 <= params.iterations <= 10000 or params.batch_slices < 0 or params.series_index < 0:
            raise InputError("properties iterations (1–10000), batch_slices (≥ 0), series_index (≥ 0) out of range")
        return params

    @staticmethod
    def _convert(name, kind, raw):
        text = str(raw).strip()
        try:
            if kind in ("int", int):
                return int(text)
            if kind in ("bool", bool):
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
        except ValueError:
            raise InputError(f"property {name}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None
        return text


def properties_of(config) -> dict:
    """``{name: value}`` of the ``<property>`` elements in a gadget configuration element (None → {})."""
    if config is None:
        return {}
    return {p.get("name"): p.get("value", "") for p in config.iter("property") if p.get("name")}


# --------------------------------------------------------------------------------------- reconstructor cache
class ReconstructorCache:
    """Reconstructors by (dictionary, network, iterations, device): loaded once, shared by connections.

    ``loads`` counts constructions (a warm server's second scan must not add one)."""

    def __init__(self, factory=None):
        self._factory = factory
        self._items = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, params: Parameters):
        key = (params.dictionary, params.network, params.iterations, params.device)
        with self._lock:
            if key not in self._items:
                factory = self._factory
                if factory is None:
                    from recon.pipeline import Reconstructor as factory  # noqa: N813 - torch import on first use
                start = time.perf_counter()
                self._items[key] = factory(dictionary=params.dictionary, network=params.network,
                                           iterations=params.iterations, device=params.device)
                self.loads += 1
                log.info("loaded reconstructor %s in %.2f s", key, time.perf_counter() - start)
            return self._items[key]


_DEFAULT_CACHE = ReconstructorCache()


# ------------------------------------------------------------------------------------------------------ scan
class Scan:
    """One connection's state: buffering, batching, reconstruction and image output.

    ``send`` is called with each outgoing item; ``failures`` collects per-slice error messages; ``cpu_fallback``
    (no arguments) returns a CPU reconstructor for slices that fail on the GPU (None: no fallback)."""

    def __init__(self, header, params: Parameters, reconstructor, chain_name: str, send, cpu_fallback=None):
        self.header = header
        self.params = params
        self.rec = reconstructor
        self.cpu_fallback = cpu_fallback
        self.chain_name = chain_name
        self.send = send
        self.enc = read_encoding(header)
        calibration = {"auto": None, "true": True, "false": False}.get(params.calibration_in_data.lower())
        self.buffer = AcquisitionBuffer(self.enc, max_open_groups=params.max_open_images,
                                        calibration_in_data=calibration)
        device = getattr(reconstructor, "device", torch.device("cpu"))
        self.batch = params.batch_slices or (8 if getattr(device, "type", "cpu") == "cuda" else 1)
        self.pending: list[SliceInput] = []
        self.whitening = None
        self.whitening_ready = False
        self.failures: list[str] = []
        self.indices: dict[int, int] = {}
        self.sent = 0
        self._reported = 0

    # -- input
    def on_item(self, item) -> None:
        if isinstance(item, ismrmrd.Acquisition):
            for group in self.buffer.add(item):
                self._queue(group)
        elif isinstance(item, ReconData):
            self._recon_data(item)
        elif isinstance(item, (ismrmrd.Image, ImageArray)):
            self.send(item)  # not ours: pass it on down the chain
        else:
            log.debug("ignoring a %s", type(item).__name__)
        self._collect_buffer_errors()

    def finish(self, complete: bool = True) -> None:
        """End of the stream: reconstruct the images still open, or, when the stream did not end with CLOSE
        (``complete`` False: the peer vanished mid-scan), report them instead of reconstructing partial k-space."""
        for group in self.buffer.flush():
            if complete:
                self._queue(group)
            else:
                self._fail(group.key.describe(), RuntimeError(
                    "not reconstructed: the stream ended without a CLOSE message before this image was complete"))
        self._run_pending()
        self._collect_buffer_errors()

    def _collect_buffer_errors(self):
        for message in self.buffer.errors[self._reported:]:
            log.error("%s", message)
            self.failures.append(message)
        self._reported = len(self.buffer.errors)

    def _queue(self, group) -> None:
        if group.errors:
            message = f"{group.key.describe()}: not reconstructed: " + "; ".join(group.errors)
            log.error("%s", message)
            self.failures.append(message)
            return
        if not self.whitening_ready:
            self.whitening = whitening_matrix(self.buffer.noise, self.buffer.noise_sample_time_us,
                                              group.sample_time_us)
            self.whitening_ready = True
            log.info("prewhitening: %s", "from the noise scan" if self.whitening is not None else "none (no noise scan)")
        try:
            inputs = prepare_group(group, self.whitening, self.enc.oversampling)
        except Exception as error:  # noqa: BLE001 - one group's failure must not end the scan
            self._fail(group.key.describe(), error)
            return
        del group  # the raw k-space is released here
        self.pending.extend(inputs)
        if len(self.pending) >= self.batch:
            self._run_pending()

    def _fail(self, where: str, error: Exception) -> None:
        message = f"{where}: reconstruction failed: {error}"
        log.error("%s", message)
        self.failures.append(message)

    # -- reconstruction
    def _reconstruct(self, inputs: list[SliceInput]):
        """``[(inputs, result, note)]`` for ``inputs`` (same shape): batched; one by one when the batch fails; a
        slice that fails on the GPU is redone on the CPU (``note`` says so); one that still fails is reported."""
        try:
            return [(inputs, self._reconstruct_batch(self.rec, inputs), "")]
        except Exception as error:  # noqa: BLE001 - isolate the failure to the slices it concerns
            if len(inputs) == 1:
                return self._redo_on_cpu(inputs[0], error)
            log.warning("a batch of %d slices failed (%s: %s): reconstructing them one by one", len(inputs),
                        type(error).__name__, error)
            _release_gpu_memory()
        results = []
        for one in inputs:
            try:
                results.append(([one], self._reconstruct_batch(self.rec, [one]), ""))
            except Exception as error:  # noqa: BLE001
                results += self._redo_on_cpu(one, error)
        return results

    def _redo_on_cpu(self, one: SliceInput, error: Exception):
        on_gpu = getattr(getattr(self.rec, "device", None), "type", "cpu") != "cpu"
        if not on_gpu or self.cpu_fallback is None or isinstance(error, ValueError):  # bad input fails anywhere
            self._fail(one.describe(), error)
            return []
        reason = "GPU out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else (
            f"GPU failure ({type(error).__name__})")
        log.warning("%s: %s (%s); reconstructing this slice on the CPU", one.describe(), reason, error)
        _release_gpu_memory()
        try:
            result = self._reconstruct_batch(self.cpu_fallback(), [one])
        except Exception as cpu_error:  # noqa: BLE001
            self._fail(one.describe(), RuntimeError(f"{error}; on the CPU as well: {cpu_error}"))
            return []
        return [([one], result, f"reconstructed on the CPU after {reason}")]

    def _reconstruct_batch(self, rec, inputs: list[SliceInput]):
        from recon import coils as _coils
        from recon.pipeline import default_calibration_mask

        kspace = np.stack([s.kspace for s in inputs])
        mask = np.stack([s.mask for s in inputs])
        maps = None
        if kspace.shape[1] > 1:
            maps = []
            for s in inputs:
                if s.calibration is not None:
                    cal_k, cal_m = torch.from_numpy(s.calibration), torch.from_numpy(s.calibration_mask)
                else:
                    cal_k = torch.from_numpy(s.kspace)
                    cal_m = default_calibration_mask(torch.from_numpy(s.mask))
                maps.append(_coils.estimate_coil_maps(cal_k, cal_m).numpy())
            maps = np.stack(maps)
        return rec.reconstruct(kspace, mask, coil_maps=maps)

    def _run_pending(self) -> None:
        while self.pending:
            shape = self.pending[0].kspace.shape
            batch = [s for s in self.pending if s.kspace.shape == shape][: self.batch]
            self.pending = [s for s in self.pending if not any(s is b for b in batch)]
            for inputs, result, note in self._reconstruct(batch):
                for i, one in enumerate(inputs):
                    self._send_images(one, result, i, note)

    # -- output
    def _next_index(self, series: int) -> int:
        self.indices[series] = self.indices.get(series, 0) + 1
        return self.indices[series]

    def _field_of_view(self, partitions: int) -> tuple:
        efov, rfov = self.enc.encoded_fov, self.enc.recon_fov
        z = rfov[2] / partitions if partitions > 1 else rfov[2]
        return (rfov[0], efov[1], z)

    def _send_images(self, one: SliceInput, result, i: int, note: str = "") -> None:
        base = self.params.series_index
        fov = self._field_of_view(one.partitions)
        device = "cpu" if note else str(getattr(self.rec, "device", "cpu"))
        common = dict(field_of_view=fov, identity=self.rec.identity, chain=self.chain_name,
                      partition=one.partition, partitions=one.partitions,
                      slice_thickness=fov[2] if one.partitions > 1 else 0.0, note=note,
                      extra_meta={"CDL_Iterations": str(self.params.iterations), "CDL_Device": device,
                                  "CDL_Readouts": str(one.readouts)})
        outputs = [("image", result.image[i])]
        if self.params.send_zero_filled:
            outputs.append(("zero_filled", result.zero_filled[i]))
        if self.params.send_lambda_maps and result.lambda_maps is not None:
            outputs.append(("lambda", np.ascontiguousarray(result.lambda_maps[i], dtype=np.float32)))
        for kind, pixels in outputs:
            if kind != "lambda":
                pixels = pixels.astype(np.complex64) if self.params.output == "complex" else np.abs(pixels).astype(
                    np.float32)
            series = base + _images.SERIES_OFFSETS[kind]
            image = _images.build_image(pixels, one.reference, kind=kind, image_index=self._next_index(series),
                                        series_index=series, **common)
            self.send(image)
            self.sent += 1

    # -- ReconData (Gadgetron's BucketToBufferGadget in front)
    def _recon_data(self, recon_data: ReconData) -> None:
        for bit in recon_data.bits:
            try:
                self._recon_bit(bit)
            except Exception as error:  # noqa: BLE001 - one bit's failure must not end the scan
                self._fail("ReconData bit", error)

    def _recon_bit(self, bit) -> None:
        from gadgets.recon_data import bit_inputs, image_array

        inputs = bit_inputs(bit)
        results = {}
        for start in range(0, len(inputs), self.batch):
            for batch_inputs, result, note in self._reconstruct(inputs[start:start + self.batch]):
                for i, one in enumerate(batch_inputs):
                    results[id(one)] = (result.image[i], one, note)
        if results:
            self.send(image_array(bit, inputs, results, self, _images))
            self.sent += 1


# ---------------------------------------------------------------------------------------------- the gadget
class CDLLambdaGadget:
    """The Gadgetron target. ``handle(connection)`` serves one connection: a gadgetron ``Connection`` (active mode,
    already past the handshake) or a :class:`RobustConnection` (server, replay)."""

    def __init__(self, cache: ReconstructorCache | None = None, registry: ChainRegistry | None = None):
        self.cache = cache or _DEFAULT_CACHE
        self.registry = registry

    def handle(self, connection) -> int:
        """Serve ``connection`` to its end; returns the number of items sent. Never raises."""
        original = connection
        connection = RobustConnection.adopt(connection) if not isinstance(connection, RobustConnection) else connection
        sent, scan = 0, None
        try:
            registry = self.registry or ChainRegistry()
            chain = registry.select(connection.config_name, connection.header)
            params = Parameters.from_sources(chain.parameters, properties_of(connection.config), connection.parameters)
            log.info("chain %r: %s", chain.name, params)
            reconstructor = self.cache.get(params)
            scan = Scan(connection.header, params, reconstructor, chain.name, connection.send,
                        cpu_fallback=lambda: self.cache.get(replace(params, device="cpu")))
            start = time.perf_counter()
            for item in connection:
                scan.on_item(item)
            scan.finish(complete=getattr(connection, "ended_with_close", True))
            sent = scan.sent
            log.info("scan done: %d item(s) sent in %.2f s", sent, time.perf_counter() - start)
            if scan.failures:
                connection.fail(f"{len(scan.failures)} problem(s); {sent} image(s) were sent. "
                                + " | ".join(scan.failures[:20]))
            else:
                connection.close()
        except Exception as error:  # noqa: BLE001 - everything must reach the peer as an ERROR message
            log.exception("CDL-Λ gadget failed")
            progress = "" if scan is None else (f"; {scan.sent} image(s) had been sent, images still open were not "
                                                "reconstructed" + "".join(f" | {f}" for f in scan.failures[:20]))
            connection.fail(f"CDL-Lambda gadget failed: {type(error).__name__}: {error}{progress}")
            sent = 0 if scan is None else scan.sent
        finally:
            if original is not connection:
                original.socket = _Closed()
        return sent


def _release_gpu_memory() -> None:
    """Return cached GPU memory after a failure (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Closed:
    """Stands in for gadgetron's socket wrapper after we closed the socket (its exit would send CLOSE again)."""

    def close(self):
        pass


def cdl_lambda(connection) -> None:
    """Function target for ``<execute name="gadgets.handler" target="cdl_lambda" type="python"/>``."""
    CDLLambdaGadget().handle(connection)
