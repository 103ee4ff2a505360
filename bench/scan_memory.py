"""Peak memory of one scan in a warm server, by scan size, against the memory budget's estimate.

For each kind (``MATRIXxCOILS[xSLICES]``) a fresh ``cdl-lambda serve --no-supervisor`` is started, warmed up with a
small scan of another size (torch, the compiler and the weights loaded), its peak-RSS mark reset
(``/proc/PID/clear_refs``), and one scan of the kind sent: the peak resident memory above the warm, idle server is
the scan's cost, including what its first run of that size compiles and allocates for good (a second scan of the
size reuses that). Printed and written as a Markdown table (default docs/bench_scan_memory.md) next to
:func:`gadgets.memory_budget.scan_bytes`, which must not be below any measured peak.

    python bench/scan_memory.py [--kinds 128x4 128x8 256x4 256x8 128x4x4] [--param iterations=64]
    python bench/scan_memory.py --table docs/bench_scan_memory.json   # the table again, with today's estimate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ismrmrd

from bench.report import publish
from bench.soak import Kind, free_port, good_scan, header_xml, make_kind, proc_status, start_server, \
    synthetic_acquisitions
from cdl_lambda.gadgets import memory_budget
from cdl_lambda.recon.weights import WeightsRegistry


def kind_of(name: str) -> Kind:
    parts = [int(v) for v in name.split("x")]
    if len(parts) == 2:
        return make_kind(name)
    matrix, coils, slices = parts
    return Kind(name, header_xml(matrix, coils, slices), synthetic_acquisitions(matrix, coils, slices, seed=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["128x4", "128x8", "256x4", "256x8", "128x4x4"])
    parser.add_argument("--param", action="append", default=[], help="NAME=VALUE sent with every scan")
    parser.add_argument("--out", default="docs/bench_scan_memory.md")
    parser.add_argument("--table", default=None, metavar="JSON",
                        help="measure nothing: write the table from these saved measurements")
    args = parser.parse_args(argv)
    parameters = dict(p.split("=", 1) for p in args.param)
    filters = WeightsRegistry().dictionary("default").num_filters
    saved = Path(args.out).with_suffix(".json")
    if args.table:
        measured = json.loads(Path(args.table).read_text())
    else:
        measured = {"command": f"python bench/scan_memory.py {' '.join(argv or sys.argv[1:])}".strip(),
                    "threads": os.environ.get("OMP_NUM_THREADS", "default"), "rows": measure(args.kinds, parameters)}
        saved.write_text(json.dumps(measured, indent=1) + "\n")
    rows = ["| scan (matrix × coils × slices) | warm idle server RSS (MiB) | peak above it (MiB) | estimate "
            "`scan_bytes` (MiB) | estimate / peak |", "|---|---|---|---|---|"]
    for name, idle, peak in measured["rows"]:
        size = memory_budget.scan_size(ismrmrd.xsd.CreateFromDocument(kind_of(name).header))
        estimate = memory_budget.scan_bytes(size, filters) / memory_budget.MiB
        rows.append(f"| {name.replace('x', ' × ')}{'' if name.count('x') == 2 else ' × 1'} | {idle:.0f} | "
                    f"{peak:.0f} | {estimate:.0f} | {estimate / max(peak, 1):.2f} |")
    text = (f"# Peak memory of one scan\n\nCommand: `{measured['command']}` (measurements kept in "
            f"`{saved.name}`)\n\nShipped network and dictionary (K = {filters}), batch size 1 (CPU), default chain, "
            f"torch threads {measured['threads']}; a fresh server per row, warmed up on a 64², 2-coil scan. The peak "
            "includes the first run of the size (its compiled kernel and FFT plans); the estimate is "
            "`gadgets.memory_budget.scan_bytes` as it is now.\n\n" + "\n".join(rows) + "\n")
    publish(text, args.out)
    return 0


def measure(kinds: list[str], parameters: dict) -> list[tuple[str, float, float]]:
    """(kind, warm idle RSS MiB, peak above it MiB) for each kind, a fresh server each."""
    warm_up = kind_of("64x2")
    results = []
    for name in kinds:
        kind = kind_of(name)
        workdir = Path(tempfile.mkdtemp(prefix="scan-memory-"))
        port = free_port()
        server = start_server(port, workdir, ["--max-concurrent", "1"])
        try:
            if good_scan(port, warm_up, parameters).errors:
                raise SystemExit(f"warm-up failed: {(workdir / 'server.log').read_text()[-2000:]}")
            time.sleep(1.0)
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            idle = proc_status(server.pid)["rss_mib"]
            outcome = good_scan(port, kind, parameters)
            if outcome.errors or not outcome.images:
                raise SystemExit(f"{name} failed: {outcome.errors}")
            peak = proc_status(server.pid)["hwm_mib"] - idle
        finally:
            server.terminate()
            server.wait(timeout=120)
        results.append((name, idle, peak))
        print(f"{name}: idle {idle:.0f} MiB, peak above it {peak:.0f} MiB", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
