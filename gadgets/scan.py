"""One connection's scan, composed: acquisitions → :mod:`gadgets.buffer` → :mod:`gadgets.slices` (one typed
:class:`gadgets.slices.ScanSlice` per group) → :func:`recon.pipeline.reconstruct_slices` (the one door: one call
down, one outcome per image back) → :mod:`gadgets.image_output` → the peer.

Slice groups are handed to the reconstruction as soon as they hold a batch of images (and at the end of the
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
from cdl_lambda.gadgets.completeness import OK, Assessment, residual_reason
from cdl_lambda.gadgets.errors import InputError
from cdl_lambda.gadgets.settings import Parameters
from cdl_lambda.gadgets.slices import ScanSlice, from_group, from_recon_bit, noise_of
from cdl_lambda.gadgets.wire import ImageArray, ReconData
from cdl_lambda.recon.pipeline import NOISE_FROM_SCAN, reconstruct_slices

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
        self.pending: list[ScanSlice] = []
        self.noise = None
        self.noise_ready = False
        self.failures: list[str] = []
        self.assessments: dict[int, Assessment] = {}  # id(ScanSlice) → what the buffer found of its k-space
        self.withheld = 0  # incomplete images not sent (slice_errors=fail)
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
        (``complete`` False: the peer vanished mid-scan), report them instead of reconstructing partial k-space;
        after the peer has gone (:attr:`abandoned`) they are counted with the dropped slices."""
        if self.abandoned or self.peer_gone():  # the images still open, and those queued, are dropped
            self._abandon(len(self.buffer.flush()))
            self._run_pending()
            return
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
        if not self.noise_ready:  # noise readouts come first: the scan's noise is known with its first group
            self.noise, self.noise_ready = noise_of(self.buffer), True
            log.info("prewhitening: %s", "from the noise scan" if self.noise is not None and self.noise.usable
                     else "none (no noise scan)")
        group_slice = from_group(group, self.noise, self.enc)  # holds the group's k-space until reconstructed
        assessment = group.completeness or Assessment()
        if assessment.status != OK and self.params.slice_errors == "fail":
            for z in range(group_slice.partitions):
                self._withhold(group_slice.image(z), assessment)
            return
        self.assessments[id(group_slice)] = assessment
        self.pending.append(group_slice)
        if sum(one.partitions for one in self.pending) >= self.rec.batch_size:
            self._run_pending()

    def _assess(self, source, one, outcome) -> Assessment:
        """The buffer's assessment of ``source`` (a slice group) plus the check of the data residual of its image
        ``one``; logged at WARNING unless ok."""
        found = self.assessments.get(id(source)) or Assessment()
        assessment = Assessment(found.status, list(found.reasons), found.measured_lines, found.expected_lines)
        iterations = getattr(outcome, "iterations_used", None)
        reason = residual_reason(getattr(outcome, "residual_to_noise", None),
                                 getattr(outcome, "noise_source", "") == NOISE_FROM_SCAN,
                                 self.params.iterations if iterations is None else int(iterations))
        if reason:
            assessment.add(reason)
        if assessment.status != OK:
            log.warning("%s: %s: %s", one.describe(), assessment.status, assessment.reason)
        return assessment

    def _withhold(self, one, assessment: Assessment) -> None:
        """slice_errors=fail: an incomplete image is not sent; the scan then ends with an ERROR naming it."""
        message = f"{one.describe()}: {assessment.status}, not sent (slice_errors=fail): {assessment.reason}"
        log.warning("%s", message)
        self.failures.append(message)
        self.withheld += 1

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
        try:
            total = sum(one.partitions for one in pending)
            if self.abandoned or (pending and self.peer_gone()):
                self._abandon(total)
                return
            done = 0
            for outcome in reconstruct_slices(self.rec, pending, self.cpu_fallback):
                done += 1
                one = outcome.source.image(outcome.partition)
                if outcome.error is not None:
                    found = self.assessments.get(id(outcome.source))
                    reason = str(outcome.error)
                    if found is not None and found.status != OK:
                        reason += f"; the slice is also {found.status}: {found.reason}"
                    self._fail(outcome.describe(), RuntimeError(reason))
                    self._placeholder(one.reference, one.key, reason, one.partitions, only=one.partition)
                    continue
                assessment = self._assess(outcome.source, one, outcome)
                if assessment.status != OK and self.params.slice_errors == "fail":
                    self._withhold(one, assessment)
                    continue
                for image in image_output.slice_images(one, outcome, self.params, identity=self.rec.identity,
                                                       chain=self.chain_name, encoding=self.enc, numbers=self.numbers,
                                                       assessment=assessment):
                    self.send(image)
                    self.sent += 1
                self.reconstructed += 1
                if done < total and self.peer_gone():
                    self._abandon(total - done)
                    return
        finally:  # the groups' assessments go with them
            for source in pending:
                self.assessments.pop(id(source), None)

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
        slices = from_recon_bit(bit, self.header, calibration_in_data=self.buffer.calibration_in_data)
        images = {}  # (array_index, partition) → SliceImage, every image the ImageArray has a slot for
        for one in slices:
            for error in one.errors:
                self._fail(one.describe(), InputError(error))
            for z in [0] if one.errors else range(one.partitions):
                images[(one.array_index, z)] = one.image(z)
        outcomes, failed, assessments = {}, {}, {}
        for outcome in reconstruct_slices(self.rec, [one for one in slices if not one.errors], self.cpu_fallback):
            index = outcome.source.array_index
            if outcome.error is not None:
                self._fail(outcome.describe(), outcome.error)
                failed[index] = str(outcome.error)
                continue
            one = images[(index, outcome.partition)]
            assessment = self._assess(outcome.source, one, outcome)
            if assessment.status != OK and self.params.slice_errors == "fail":
                self._withhold(one, assessment)
                failed[index] = f"not sent: {assessment.status}: {assessment.reason}"
                continue
            outcomes[id(one)] = outcome
            assessments[index] = assessment
        inputs = list(images.values())
        if outcomes or self.params.slice_errors == "report":
            self.send(image_output.image_array(np.asarray(bit.data.data).shape, inputs, outcomes, self.params,
                                               identity=self.rec.identity, chain=self.chain_name, encoding=self.enc,
                                               numbers=self.numbers, failed=failed, assessments=assessments))
            self.sent += 1
            self.reconstructed += len({one.array_index for one in inputs if id(one) in outcomes})
