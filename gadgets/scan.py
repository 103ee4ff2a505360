"""One connection's scan, composed: acquisitions → :mod:`gadgets.buffer` → :mod:`gadgets.slices` →
:func:`recon.pipeline.reconstruct_slices` → :mod:`gadgets.image_output` → the peer.

Slices are handed to the reconstruction as soon as the reconstructor's batch is full (and at the end of the
stream); ReconData from Gadgetron's ``BucketToBufferGadget`` goes down a bit at a time and is answered with one
ImageArray. A slice that fails is reported in :attr:`ScanSession.failures` and the others still come back; with
``slice_errors=report`` a placeholder marked NOT RECONSTRUCTED takes its place in the series (in an ImageArray a
failed image is always such a placeholder: the array has a slot for it).
"""

from __future__ import annotations

import logging

import ismrmrd
import numpy as np

from cdl_lambda.gadgets import image_output
from cdl_lambda.gadgets.buffer import AcquisitionBuffer, read_encoding
from cdl_lambda.gadgets.errors import InputError
from cdl_lambda.gadgets.settings import Parameters
from cdl_lambda.gadgets.slices import SliceInput, from_group, from_recon_bit
from cdl_lambda.gadgets.wire import ImageArray, ReconData
from cdl_lambda.recon.pipeline import reconstruct_slices
from cdl_lambda.recon.preprocessing import whitening_matrix

log = logging.getLogger(__name__)


class ScanSession:
    """One connection's state: buffering, reconstruction and image output.

    ``send`` is called with each outgoing item; ``failures`` collects per-slice error messages; ``cpu_fallback``
    (no arguments) returns a CPU reconstructor for slices that fail on the GPU (None: no fallback); ``peer_gone``
    (no arguments) tells whether the peer has gone, checked before each batch of slices: the slices still to do
    are then dropped (:attr:`abandoned` counts them) instead of reconstructed for nobody."""

    def __init__(self, header, params: Parameters, reconstructor, chain_name: str, send, cpu_fallback=None,
                 peer_gone=None):
        self.header = header
        self.params = params
        self.rec = reconstructor
        self.cpu_fallback = cpu_fallback
        self.chain_name = chain_name
        self.send = send
        self.enc = read_encoding(header)
        self.buffer = AcquisitionBuffer(self.enc, max_open_groups=params.max_open_images,
                                        calibration_in_data=params.calibration_in_data_flag)
        self.pending: list[SliceInput] = []
        self.whitening = None
        self.whitening_ready = False
        self.failures: list[str] = []
        self.numbers = image_output.ImageNumbers()
        self.sent = 0
        self.reconstructed = 0  # images that carry a reconstruction (not placeholders)
        self._reported = 0
        self.peer_gone = peer_gone or (lambda: False)
        self.abandoned = 0

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
            self._placeholder(group.reference, group.key, "; ".join(group.errors), self.enc.nz)
            return
        if not self.whitening_ready:
            self.whitening = whitening_matrix(self.buffer.noise, self.buffer.noise_sample_time_us,
                                              group.sample_time_us)
            self.whitening_ready = True
            log.info("prewhitening: %s",
                     "from the noise scan" if self.whitening is not None else "none (no noise scan)")
        try:
            inputs = from_group(group, self.whitening, self.enc.oversampling, self.enc.image_matrix)
        except Exception as error:  # noqa: BLE001 - one group's failure must not end the scan
            self._fail(group.key.describe(), error)
            self._placeholder(group.reference, group.key, str(error), self.enc.nz)
            return
        del group  # the raw k-space is released here
        self.pending.extend(inputs)
        if len(self.pending) >= self.rec.batch_size:
            self._run_pending()

    def _fail(self, where: str, error: Exception) -> None:
        message = f"{where}: reconstruction failed: {error}"
        log.error("%s", message)
        self.failures.append(message)

    def _placeholder(self, reference, key, reason: str, partitions: int, only: int | None = None) -> None:
        """With ``slice_errors=report``: the images of a slice (every partition, or partition ``only``) that
        failed, zeros marked NOT RECONSTRUCTED."""
        if self.params.slice_errors != "report":
            return
        shape = tuple(self.enc.image_matrix)  # the grid the slices are reconstructed on
        for image in image_output.placeholder_images(reference, key, reason, shape=shape, partitions=partitions,
                                                     params=self.params, identity=self.rec.identity,
                                                     chain=self.chain_name, encoding=self.enc, numbers=self.numbers,
                                                     only=only):
            self.send(image)
            self.sent += 1

    # -- reconstruction and output
    def _run_pending(self) -> None:
        pending, self.pending = self.pending, []
        if self.abandoned or (pending and self.peer_gone()):
            self._abandon(len(pending))
            return
        done = 0
        for one, outcome in reconstruct_slices(self.rec, pending, self.cpu_fallback):
            done += 1
            if outcome.error is not None:
                self._fail(one.describe(), outcome.error)
                self._placeholder(one.reference, one.key, str(outcome.error), one.partitions, only=one.partition)
                continue
            for image in image_output.slice_images(one, outcome, self.params, identity=self.rec.identity,
                                                   chain=self.chain_name, encoding=self.enc, numbers=self.numbers):
                self.send(image)
                self.sent += 1
            self.reconstructed += 1
            if done < len(pending) and self.peer_gone():
                self._abandon(len(pending) - done)
                return

    def _abandon(self, count: int) -> None:
        if not self.abandoned:
            log.warning("the peer has gone: dropping the scan's remaining slices")
        self.abandoned += count

    def _recon_data(self, recon_data: ReconData) -> None:
        for bit in recon_data.bits:
            try:
                self._recon_bit(bit)
            except Exception as error:  # noqa: BLE001 - one bit's failure must not end the scan
                self._fail("ReconData bit", error)

    def _recon_bit(self, bit) -> None:
        inputs = from_recon_bit(bit, calibration_in_data=self.buffer.calibration_in_data)
        for one in inputs:
            for error in one.errors:
                self._fail(one.key.describe(), InputError(error))
        outcomes, failed = {}, {}
        usable = [one for one in inputs if not one.errors]
        for one, outcome in reconstruct_slices(self.rec, usable, self.cpu_fallback):
            if outcome.error is not None:
                self._fail(one.describe(), outcome.error)
                failed[one.array_index] = str(outcome.error)
            else:
                outcomes[id(one)] = outcome
        if outcomes or self.params.slice_errors == "report":
            self.send(image_output.image_array(np.asarray(bit.data.data).shape, inputs, outcomes, self.params,
                                               identity=self.rec.identity, chain=self.chain_name, encoding=self.enc,
                                               numbers=self.numbers, failed=failed))
            self.sent += 1
            self.reconstructed += len({one.array_index for one in inputs if id(one) in outcomes})
