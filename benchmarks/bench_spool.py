"""Cost of one ``Spool.append`` of a 5 KB payload (a typical OTLP record), with and without fsync.

Run by hand (not a test)::

    .venv/bin/python benchmarks/bench_spool.py                    # in a temporary directory
    .venv/bin/python benchmarks/bench_spool.py --dir /var/spool   # on the disk the spool will use

fsync's cost depends entirely on the device (and is near zero on tmpfs), so measure where the spool
will live. Each append is timed on its own; the median and the 99th percentile are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from genai_mlflow.exporter.spool import Spool

PAYLOAD_BYTES = 5 * 1024


def measure(directory: str, count: int, *, fsync: bool) -> list[float]:
    """Microseconds per append, for count appends into a fresh spool in directory."""
    payload = os.urandom(PAYLOAD_BYTES)
    timings: list[float] = []
    with Spool(directory, fsync=fsync) as spool:
        for _ in range(min(count, 200)):  # warm up: the first segment, the first directory scan
            spool.append(payload)
        for _ in range(count):
            start = time.perf_counter_ns()
            ok = spool.append(payload)
            timings.append((time.perf_counter_ns() - start) / 1000)
            if not ok:
                raise SystemExit(f"append was dropped (dropped={spool.dropped}); is the disk full?")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", help="where to make the temporary spool (default: the system's temp dir)")
    parser.add_argument("--count", type=int, default=20_000, help="appends without fsync")
    parser.add_argument("--fsync-count", type=int, default=1_000, help="appends with fsync")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir)
    try:
        print(f"spool in {root}; payload {PAYLOAD_BYTES} bytes")
        for fsync, count in ((False, args.count), (True, args.fsync_count)):
            timings = measure(os.path.join(root, f"fsync-{fsync}"), count, fsync=fsync)
            p99 = statistics.quantiles(timings, n=100)[98]
            print(
                f"fsync={fsync!s:5}  appends={count:6}  median {statistics.median(timings):9.1f} µs"
                f"  p99 {p99:9.1f} µs"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
