"""The warm server's memory budget: what one scan may need, what the process may hold, and a queue in between.

Each scan reserves an estimate of its peak working memory from its ISMRMRD header before it is reconstructed
(:func:`scan_bytes`) and releases it when it ends, however it ends. A scan whose reservation would take the
scans in flight past the process's ceiling waits, in arrival order, until enough has been released (one log line
when it starts waiting, one when it goes on); a scan that could not fit even alone is refused at once with an
ERROR naming both figures. The server therefore never asks the kernel for more than its ceiling, and is never
killed for memory, however many peers connect.

The estimate (bytes), from the header and the reconstructor, with ``n`` = ny·nx the image grid, ``n_enc`` the
encoded grid (readout oversampling included), ``C`` coils, ``K`` dictionary filters, ``B`` the reconstructor's batch
size and ``S`` the images held open at once (slices × partitions × contrasts × … up to ``max_open_images``)::

    scan_bytes = FIXED + S · C · n_enc · 8 · RAW_COPIES + B · n · 8 · (PER_COIL · C + PER_FILTER · K)

The coefficients bound the peaks measured on the shipped product with a margin of 1.1–1.7
(``bench/scan_memory.py``, ``docs/bench_scan_memory.md``: a fresh server's first scan of each size, so its compiled
kernel and FFT plans are included; a second scan of the size reuses them and the heap).
FISTA's iterations reuse their buffers, so the iteration count does not enter. Memory is held in one glibc heap
(:func:`recon.device.keep_freed_memory_for_reuse`), so the process holds at most ``BASELINE`` plus the largest sum of
reservations that were in flight at the same time: the ceiling.

The ceiling (``serve --memory-limit``) defaults to :data:`DEFAULT_FRACTION` of the machine's memory (or of the
cgroup's limit, when lower). The server's own resident memory with torch, the compiler and the weights loaded
(:data:`BASELINE`) is counted against it before any scan.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 2**20
GiB = 2**30

# Coefficients of the estimate (see the module docstring); upper bounds of docs/bench_scan_memory.md's peaks.
FIXED = 128 * MiB        # the allocator's top pad (M_TOP_PAD, 64 MiB) and what does not scale with the scan
RAW_COPIES = 3           # acquisitions as received, the slice group, the prepared slice on the device
PER_COIL = 75            # grid-sized complex arrays per coil at the peak (ESPIRiT, the coil operator); measured ≤ 63
PER_FILTER = 40          # grid-sized complex arrays per filter (FISTA's codes and their copies, NET_Θ); measured ≤ 35
BASELINE = 700 * MiB     # the warm server itself: torch, the compiler, weights (measured 0.55–0.65 GiB)
DEFAULT_FRACTION = 0.8   # the default ceiling: this share of the machine's (or cgroup's) memory
DEFAULT_COILS = 32       # a header that does not say how many receiver channels: assume this many
DEFAULT_FILTERS = 64     # a reconstructor that cannot be loaded (the handler reports why): the largest shipped K


class MemoryBudgetError(ValueError):
    """A scan larger than the whole budget, or a bad ``--memory-limit``."""


@dataclass(frozen=True)
class ScanSize:
    """What the estimate needs from a header: image grid (ny, nx), encoded samples per image, coils, images."""

    ny: int
    nx: int
    encoded_samples: int  # n_enc: encoded ny · nx (with readout oversampling) · partitions
    coils: int
    images: int           # 2-D images (slices × partitions × contrasts × phases × repetitions × sets)

    def describe(self) -> str:
        return f"{self.ny}×{self.nx}, {self.coils} coils, {self.images} image(s)"


def scan_size(header, max_open_images: int | None = None) -> ScanSize:
    """The :class:`ScanSize` of an ISMRMRD header (``ismrmrd.xsd.ismrmrdHeader``); InputError when the header
    lacks what the reconstruction needs (the same check the scan makes)."""
    from cdl_lambda.gadgets.buffer import read_encoding

    enc = read_encoding(header)
    ny, nx = (int(v) for v in enc.image_matrix)
    images = enc.nz
    for name in ("slice", "contrast", "phase", "repetition", "set"):
        images *= enc.limits.get(name, 0) + 1
    if max_open_images:
        images = min(images, max(int(max_open_images), 1) * enc.nz)
    coils = enc.receiver_channels or DEFAULT_COILS
    return ScanSize(ny=ny, nx=nx, encoded_samples=enc.ny * enc.nx_raw, coils=coils, images=images)


def scan_bytes(size: ScanSize, filters: int, batch_size: int = 1) -> int:
    """Estimated peak working memory of one scan (bytes); see the module docstring for the formula."""
    complex_bytes = 8
    raw = size.images * size.coils * size.encoded_samples * complex_bytes * RAW_COPIES
    grid = size.ny * size.nx * complex_bytes * max(1, min(batch_size, size.images))
    return int(FIXED + raw + grid * (PER_COIL * size.coils + PER_FILTER * filters))


# --------------------------------------------------------------------------------------- the process's ceiling
def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's (MemTotal), or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_limit() -> int:
    return int(DEFAULT_FRACTION * machine_memory())


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}


def parse_size(text: str) -> int:
    """``"1.5G"``, ``"800M"``, ``"2GiB"``, ``"1073741824"`` → bytes; ``"0"``/``"none"`` → 0 (no ceiling)."""
    value = str(text).strip().lower()
    if value in ("0", "none", "off"):
        return 0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", value)
    if not match:
        raise MemoryBudgetError(f"{text!r} is not a memory size (examples: 4G, 1500M, 0 for no limit)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:,.0f} MiB"


# ---------------------------------------------------------------------------------------------- the queue
class MemoryBudget:
    """Reservations against ``limit`` bytes (0: unlimited), granted in arrival order.

    ``reserve(nbytes, label)`` is a context manager: it returns at once when the reservation fits beside the ones
    held, else waits (logging once at WARNING) until enough is released; the reservation is released when the
    block ends, by a return or an exception. A reservation larger than ``limit`` alone raises
    :class:`MemoryBudgetError` at once instead of waiting forever."""

    def __init__(self, limit: int, baseline: int = 0):
        self.limit = int(limit)
        self.baseline = int(baseline)
        self.in_use = 0
        self.peak = 0                      # the largest sum of reservations held at once
        self.waited = 0                    # reservations that had to wait
        self._queue: collections.deque = collections.deque()  # tickets of reservations not yet granted
        self._held: dict[int, int] = {}
        self._next = 0
        self._changed = threading.Condition()

    @property
    def available(self) -> int:
        """Bytes that scans may reserve in all (the ceiling less the baseline); unlimited: a very large number."""
        return self.limit - self.baseline if self.limit else 2**62

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._queue)

    def _fits(self, ticket: int, nbytes: int) -> bool:
        return self._queue[0] == ticket and self.in_use + nbytes <= self.available

    @contextlib.contextmanager
    def reserve(self, nbytes: int, label: str = "a scan"):
        nbytes = max(0, int(nbytes))
        if nbytes > self.available:
            raise MemoryBudgetError(
                f"{label} needs an estimated {_mib(nbytes)}, more than the server's memory limit allows "
                f"({_mib(self.limit)} less {_mib(self.baseline)} for the server itself); raise serve --memory-limit "
                "or reconstruct this scan elsewhere")
        with self._changed:
            ticket, self._next = self._next, self._next + 1
            self._queue.append(ticket)
            if not self._fits(ticket, nbytes):
                self.waited += 1
                log.warning("memory budget: %s needs %s, %s of %s in use by %d scan(s), %d ahead in the queue: "
                            "waiting", label, _mib(nbytes), _mib(self.in_use), _mib(self.available), len(self._held),
                            self._queue.index(ticket))
                start = time.monotonic()
                try:
                    self._changed.wait_for(lambda: self._fits(ticket, nbytes))
                except BaseException:
                    self._queue.remove(ticket)
                    self._changed.notify_all()
                    raise
                log.info("memory budget: %s goes on after waiting %.1f s (%s in use)", label,
                         time.monotonic() - start, _mib(self.in_use + nbytes))
            self._queue.popleft()
            self._held[ticket] = nbytes
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
            self._changed.notify_all()  # the next in the queue may fit as well
        try:
            yield nbytes
        finally:
            with self._changed:
                self.in_use -= self._held.pop(ticket)
                self._changed.notify_all()


# ------------------------------------------------------------------------------------------ the server's hook
def connection_bytes(gadget, connection) -> tuple[int, str]:
    """(estimated bytes, a label) for the scan on ``connection``, with the reconstructor its chain selects (loaded
    now if it was not: the handler would load it next). A header or chain the handler will refuse gets the
    estimate of a small scan: the handler reports the actual error."""
    from cdl_lambda.gadgets.chains import ChainRegistry
    from cdl_lambda.gadgets.settings import Parameters, properties_of

    filters, batch, open_images = DEFAULT_FILTERS, 1, None
    try:
        registry = gadget.registry or ChainRegistry()
        chain = registry.select(connection.config_name, connection.header)
        params = Parameters.from_sources(chain.parameters, properties_of(connection.config), connection.parameters,
                                         gadget.overrides)
        open_images = params.max_open_images
        reconstructor = gadget.cache.get(params)
        filters = reconstructor.dictionary.num_filters
        batch = reconstructor.batch_size
    except Exception as error:  # noqa: BLE001 - the handler reports the error to the peer; here only the size matters
        log.debug("memory budget: estimating with defaults (%s)", error)
    try:
        size = scan_size(connection.header, open_images)
    except Exception:  # noqa: BLE001 - a header the scan will refuse (the handler says why): reserve the fixed part
        return FIXED, "a scan with an unreadable header"
    return scan_bytes(size, filters, batch), f"a scan of {size.describe()}, K = {filters}"


def serve_within(budget: MemoryBudget | None, gadget, connection) -> None:
    """``gadget.handle(connection)`` once the scan's reservation fits in ``budget`` (None: at once); a scan that
    can never fit gets an ERROR message naming both figures. Never raises."""
    if budget is None:
        gadget.handle(connection)
        return
    nbytes, label = connection_bytes(gadget, connection)
    try:
        with budget.reserve(nbytes, label):
            gadget.handle(connection)
    except MemoryBudgetError as error:
        log.error("memory budget: refusing %s", error)
        connection.fail(f"CDL-Lambda server: {error}")


def add_arguments(parser) -> None:
    parser.add_argument("--memory-limit", type=_size_argument, default=argparse.SUPPRESS, metavar="SIZE",
                        help="ceiling for the server's memory (e.g. 4G, 1500M; 0 = none); scans that would pass it "
                             f"wait in a queue (default: {DEFAULT_FRACTION * 100:.0f}%% of the machine's memory)")


def _size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except MemoryBudgetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def budget_from_arguments(args) -> MemoryBudget:
    """The server's budget: ``--memory-limit`` (None: :func:`default_limit`), the server's baseline counted in.
    Also puts every thread on one allocator heap (:func:`recon.device.keep_freed_memory_for_reuse`): call it before
    the server starts threads."""
    from cdl_lambda.recon.device import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()
    limit = getattr(args, "memory_limit", None)
    limit = default_limit() if limit is None else limit
    if limit and limit <= BASELINE:
        raise MemoryBudgetError(f"--memory-limit {_mib(limit)} leaves nothing for scans: the server itself needs "
                                f"about {_mib(BASELINE)}")
    budget = MemoryBudget(limit, BASELINE if limit else 0)
    log.info("memory budget: %s", f"{_mib(limit)} for the process, {_mib(budget.available)} for scans" if limit
             else "no limit")
    return budget
