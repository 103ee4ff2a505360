"""The server's memory budget: estimate from the header, admission, waiting in arrival order, release, refusal."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import ismrmrd
import pytest

from cdl_lambda.gadgets import memory_budget
from cdl_lambda.gadgets.memory_budget import MemoryBudget, MemoryBudgetError, MiB, ScanSize, scan_bytes, scan_size

EXAMPLE = Path(__file__).resolve().parents[2] / "gadgets" / "examples" / "shepp_logan_128_4coils.h5"


def example_header():
    import h5py
    with h5py.File(EXAMPLE, "r") as handle:
        return ismrmrd.xsd.CreateFromDocument(handle["dataset"]["xml"][0])


def wait_until(condition, what: str, limit: float = 60.0) -> None:
    """Poll ``condition`` (a thread reaching its wait); the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.001)


class Holder(threading.Thread):
    """Reserves ``nbytes`` in a thread and keeps it until :attr:`release` is set."""

    def __init__(self, budget: MemoryBudget, nbytes: int, order: list | None = None, fail: bool = False):
        super().__init__(daemon=True)
        self.budget, self.nbytes, self.order, self.fail = budget, nbytes, order, fail
        self.entered = threading.Event()
        self.release = threading.Event()
        self.error = None

    def run(self):
        try:
            with self.budget.reserve(self.nbytes, f"scan of {self.nbytes}"):
                if self.order is not None:
                    self.order.append(self.nbytes)
                self.entered.set()
                self.release.wait()
                if self.fail:
                    raise RuntimeError("reconstruction failed")
        except (RuntimeError, MemoryBudgetError) as error:
            self.error = error


def test_the_example_header_gives_its_size_and_the_estimate_grows_with_every_factor():
    size = scan_size(example_header())
    assert (size.ny, size.nx, size.coils, size.images) == (128, 128, 4, 1)
    assert size.encoded_samples == 128 * 256  # 2× readout oversampling in the encoded space
    base = scan_bytes(size, filters=32)
    larger = [scan_bytes(ScanSize(256, 256, 256 * 512, 4, 1), 32), scan_bytes(ScanSize(128, 128, 128 * 256, 8, 1), 32),
              scan_bytes(ScanSize(128, 128, 128 * 256, 4, 20), 32), scan_bytes(size, filters=64),
              scan_bytes(ScanSize(128, 128, 128 * 256, 4, 4), 32, batch_size=4)]
    assert all(value > base for value in larger), (base, larger)
    # a 256² grid has 4× the pixels of a 128² one: every part that scales with the grid grows 4×
    assert scan_bytes(ScanSize(256, 256, 256 * 512, 4, 1), 32) - memory_budget.FIXED == 4 * (base - memory_budget.FIXED)


def test_reservations_that_fit_are_admitted_at_once_and_released_at_the_end():
    budget = MemoryBudget(limit=1000 * MiB, baseline=200 * MiB)
    assert budget.available == 800 * MiB
    with budget.reserve(300 * MiB):
        with budget.reserve(500 * MiB):
            assert budget.in_use == 800 * MiB
    assert budget.in_use == 0 and budget.peak == 800 * MiB and budget.waited == 0


def test_a_scan_larger_than_the_whole_budget_is_refused_at_once_naming_both_figures():
    budget = MemoryBudget(limit=1000 * MiB, baseline=200 * MiB)
    with pytest.raises(MemoryBudgetError, match=r"900 MiB.*1,000 MiB less 200 MiB"):
        with budget.reserve(900 * MiB, "a scan of 900 MiB"):
            pass
    assert budget.in_use == 0 and budget.waiting == 0


def test_a_scan_that_would_pass_the_limit_waits_with_a_log_line_until_memory_is_released(caplog):
    budget = MemoryBudget(limit=100)
    first = Holder(budget, 60)
    first.start()
    first.entered.wait()
    second = Holder(budget, 60)
    with caplog.at_level(logging.INFO, logger="cdl_lambda.gadgets.memory_budget"):
        second.start()
        wait_until(lambda: budget.waiting == 1, "the second scan queues")
        assert not second.entered.is_set() and budget.in_use == 60
        first.release.set()
        second.entered.wait()
        second.release.set()
        second.join()
    first.join()
    assert budget.in_use == 0 and budget.waited == 1 and budget.peak == 60
    messages = [r.getMessage() for r in caplog.records]
    assert any(r.levelno == logging.WARNING and "scan of 60 needs" in r.getMessage() and "waiting" in r.getMessage()
               for r in caplog.records), messages
    assert any("goes on after waiting" in m for m in messages), messages


def test_waiting_scans_go_in_arrival_order_so_a_small_one_cannot_overtake_a_large_one():
    budget = MemoryBudget(limit=100)
    order: list[int] = []
    running = Holder(budget, 60, order)
    running.start()
    running.entered.wait()
    large, small = Holder(budget, 70, order), Holder(budget, 10, order)
    large.start()
    wait_until(lambda: budget.waiting == 1, "the large scan queues")
    small.start()  # 60 + 10 would fit now, but the large scan came first
    wait_until(lambda: budget.waiting == 2, "the small scan queues behind it")
    assert not small.entered.is_set()
    running.release.set()
    large.entered.wait()
    small.entered.wait()  # 70 + 10 fit together
    assert order == [60, 70, 10] and budget.in_use == 80
    for holder in (large, small):
        holder.release.set()
        holder.join()
    running.join()
    assert budget.in_use == 0


def test_a_failed_scan_releases_its_reservation_and_the_waiting_scan_goes_on():
    budget = MemoryBudget(limit=100)
    failing = Holder(budget, 80, fail=True)
    failing.start()
    failing.entered.wait()
    waiting = Holder(budget, 50)
    waiting.start()
    wait_until(lambda: budget.waiting == 1, "the second scan queues")
    failing.release.set()
    failing.join()
    assert isinstance(failing.error, RuntimeError)
    waiting.entered.wait()
    assert budget.in_use == 50
    waiting.release.set()
    waiting.join()
    assert budget.in_use == 0 and budget.waiting == 0


class FakeConnection:
    def __init__(self, header):
        self.header, self.config_name, self.config, self.parameters = header, "cdl-lambda", None, {}
        self.failed = None

    def fail(self, message):
        self.failed = message


class FakeGadget:
    """Stands in for CDLLambdaGadget: records the in-use figure while it handles a scan."""

    registry = cache = None
    overrides: dict = {}

    def __init__(self, budget=None):
        self.budget, self.seen = budget, []

    def handle(self, connection):
        self.seen.append(self.budget.in_use if self.budget else None)


def test_the_server_hook_reserves_the_estimate_while_handling_and_refuses_a_scan_that_can_never_fit():
    header = example_header()
    estimate, label = memory_budget.connection_bytes(FakeGadget(), FakeConnection(header))
    assert estimate == scan_bytes(scan_size(header), memory_budget.DEFAULT_FILTERS) and "128×128, 4 coils" in label

    budget = MemoryBudget(limit=estimate + 10 * MiB, baseline=10 * MiB)
    gadget, connection = FakeGadget(budget), FakeConnection(header)
    memory_budget.serve_within(budget, gadget, connection)
    assert gadget.seen == [estimate] and connection.failed is None and budget.in_use == 0

    small = MemoryBudget(limit=estimate, baseline=10 * MiB)
    gadget, connection = FakeGadget(small), FakeConnection(header)
    memory_budget.serve_within(small, gadget, connection)
    assert gadget.seen == [] and "memory limit" in connection.failed and small.in_use == 0


def test_memory_sizes_parse_and_a_bad_one_is_named():
    assert memory_budget.parse_size("4G") == 4 * 2**30
    assert memory_budget.parse_size("1500M") == 1500 * MiB
    assert memory_budget.parse_size("2GiB") == 2 * 2**30
    assert memory_budget.parse_size("0") == 0
    with pytest.raises(MemoryBudgetError, match="'lots' is not a memory size"):
        memory_budget.parse_size("lots")
    assert 0 < memory_budget.default_limit() <= memory_budget.machine_memory()


def test_serve_refuses_to_start_with_a_limit_that_leaves_nothing_for_scans(caplog):
    from cdl_lambda.gadgets.cli import main
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--port", "0", "--no-supervisor", "--memory-limit", "300M"]) == 2
    assert any("leaves nothing for scans" in r.getMessage() for r in caplog.records), caplog.text
