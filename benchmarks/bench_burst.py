"""Burst: 20,000 standalone LLM calls made as fast as the app can, in mode ``call``, against the stack.

Run by hand (not a test); needs PostgreSQL on 127.0.0.1:5432 (trust, user postgres)::

    .venv/bin/python benchmarks/bench_burst.py --quick                   # 2,000 calls, a few minutes
    .venv/bin/python benchmarks/bench_burst.py                           # 20,000 calls; see below
    .venv/bin/python benchmarks/bench_burst.py --writer process          # the writer in its own process
    nohup .venv/bin/python benchmarks/bench_burst.py > burst.txt 2>&1 &  # the long one, in the background

One thread of the real ``openai`` client calls the in-process ``OpenAIServer`` back to back, under one
persona, with ``genai_mlflow.instrument(mode="call")`` writing to the stack of ``tests/mlflow_stack.py``
(``mlflow server`` with the local stack's 4 workers, on PostgreSQL, moto S3). Reported: the app's time
for the calls, the time until ``flush()`` returns True (everything landed), the peak RSS of this
process (VmHWM; it also hosts the OpenAIServer) and of the writer process with ``--writer process``,
the peak size of the spool directory, and the runs that landed: counted with
``MlflowClient.search_runs`` over the experiment (paged), and cross-checked in PostgreSQL (finished
runs, traces, traces linked to a run). Progress (landed so far, RSS, spool bytes) goes to stderr every
``--every`` seconds.

Mode ``call`` lands about 20 calls/s on 2 cores with the stack's 4 MLflow workers, so 20,000 calls
take about 17 minutes. With
``--max-minutes`` the wait for ``flush()`` is bounded; past it the figure printed is the landing rate
measured so far and the time projected from it, labelled PROJECTED.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

import bench_exporter_common as common
import genai_mlflow
from genai_mlflow.setup import Handle
from genai_mlflow.testing.openai_server import OpenAIServer


@dataclass
class Progress:
    """Sampled while the burst lands: the peaks, and (elapsed s, landed) points for the rate."""

    points: list[tuple[float, int]] = field(default_factory=list)
    peak_spool_bytes: int = 0
    peak_app_rss_mb: float = 0.0
    peak_writer_rss_mb: float = 0.0


def _dir_bytes(path: Path) -> int:
    total = 0
    for entry in path.glob("*"):
        with contextlib.suppress(OSError):
            total += entry.stat().st_size
    return total


def _rss_mb(pid: int | str) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _finished_runs(db_url: str, experiment: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM runs r JOIN experiments e ON e.experiment_id = r.experiment_id "
            "WHERE e.name = %s AND r.status = 'FINISHED'",
            (experiment,),
        ).fetchone()
    return int(row[0]) if row else 0


class Sampler(threading.Thread):
    def __init__(
        self, every_s: float, started: float, db_url: str, experiment: str, spool: Path, handle: Handle
    ) -> None:
        super().__init__(daemon=True)
        self.progress = Progress()
        self._every = every_s
        self._t0 = started
        self._db_url = db_url
        self._experiment = experiment
        self._spool = spool
        self._handle = handle
        self._stop_event = threading.Event()

    def writer_pid(self) -> int | None:
        pipeline = self._handle.pipeline
        process = pipeline.drain_process if pipeline is not None else None
        return process.pid if process is not None and process.poll() is None else None

    def sample(self) -> None:
        p = self.progress
        elapsed = time.perf_counter() - self._t0
        landed = _finished_runs(self._db_url, self._experiment)
        p.points.append((elapsed, landed))
        p.peak_spool_bytes = max(p.peak_spool_bytes, _dir_bytes(self._spool))
        app = _rss_mb("self")
        p.peak_app_rss_mb = max(p.peak_app_rss_mb, app)
        pid = self.writer_pid()
        writer = _rss_mb(pid) if pid else 0.0
        p.peak_writer_rss_mb = max(p.peak_writer_rss_mb, writer)
        rate = ""
        if len(p.points) >= 2:
            (t0, n0), (t1, n1) = p.points[-2], p.points[-1]
            rate = f", {(n1 - n0) / max(t1 - t0, 1e-9):.1f}/s lately"
        writer_note = f", writer RSS {writer:.0f} MiB" if pid else ""
        print(
            f"  {elapsed:7.0f} s: landed {landed}{rate}; app RSS {app:.0f} MiB{writer_note}; "
            f"spool {p.peak_spool_bytes / 2**20:.0f} MiB peak",
            file=sys.stderr,
            flush=True,
        )

    def run(self) -> None:
        while not self._stop_event.wait(self._every):
            try:
                self.sample()
            except Exception as exc:  # a progress line is not worth ending the benchmark for
                print(f"  (progress sample failed: {exc})", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def steady_rate(points: list[tuple[float, int]], since: float) -> float | None:
    """Landed per second from ``since`` (the end of the app's calls) to the last sample."""
    later = [(t, n) for t, n in points if t >= since]
    if len(later) < 2 or later[-1][0] - later[0][0] <= 0:
        return None
    (t0, n0), (t1, n1) = later[0], later[-1]
    return (n1 - n0) / (t1 - t0)


def count_with_search_runs(tracking_uri: str, experiment: str) -> tuple[int, float]:
    """Runs in the experiment, paged through ``MlflowClient.search_runs``; (count, seconds taken)."""
    from mlflow import MlflowClient

    started = time.perf_counter()
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0, time.perf_counter() - started
    count = 0
    token: str | None = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=5000, page_token=token)
        count += len(page)
        token = page.token
        if not token:
            break
    return count, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2,000 calls instead of 20,000")
    parser.add_argument("--calls", type=int, help="calls in the burst")
    parser.add_argument("--writer", choices=("thread", "process"), default="thread")
    parser.add_argument("--workers", type=int, default=8, help="the writer's parallel MLflow requests")
    parser.add_argument("--max-minutes", type=float, default=120.0, help="bound on the wait for flush()")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    calls = args.calls or (2_000 if args.quick else 20_000)
    common.quiet_logs()

    with (
        tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp,
        OpenAIServer() as server,
        common.running_stack(Path(tmp) / "stack") as stack,
    ):
        client = common.make_client(server.base_url)
        # Warm the server's workers and the client on another persona, then start afresh.
        spool = Path(tmp) / f"spool-{uuid.uuid4().hex[:8]}"
        handle = genai_mlflow.instrument(
            stack.tracking_uri, mode="call", spool_dir=str(spool), writer=args.writer, workers=args.workers
        )
        with genai_mlflow.persona(common.new_persona("burst_warmup")):
            for i in range(20):
                common.chat(client, i)
        handle.flush(120)

        try:
            persona = common.new_persona("burst")
            experiment = common.experiment_of(persona)
            meter = common.CpuMeter(stack)
            meter.start()
            started = time.perf_counter()
            sampler = Sampler(args.every, started, stack.db_url, experiment, spool, handle)
            sampler.start()
            print(f"burst of {calls} calls, writer {args.writer} ...", file=sys.stderr, flush=True)
            with genai_mlflow.persona(persona):
                for i in range(calls):
                    common.chat(client, i)
            app_s = time.perf_counter() - started
            print(f"  app done in {app_s:.1f} s", file=sys.stderr, flush=True)
            flushed = handle.flush(max(1.0, args.max_minutes * 60 - app_s))
            landed_s = time.perf_counter() - started
            sampler.sample()
            sampler.stop()
            cpu = meter.stop()
            writer_pid = sampler.writer_pid()
            writer_peak = common.peak_rss_mb(writer_pid) if writer_pid else None
            app_peak = common.peak_rss_mb()
            handle.shutdown(timeout_s=30)

            searched, search_s = count_with_search_runs(stack.tracking_uri, experiment)
            found = common.landed(stack.db_url, experiment)
        finally:
            handle.shutdown(timeout_s=30)
        progress = sampler.progress

    lines = [
        f"Burst: {calls} standalone calls, mode call, writer {args.writer} ({args.workers} workers)",
        common.versions(),
        common.load_note(),
        "app: real openai client -> in-process OpenAIServer, one thread, back to back; "
        f"MLflow server {stack.workers} workers on PostgreSQL, moto S3, same machine",
        "",
    ]
    rate = calls / landed_s
    rows = [["figure", "value"]]
    rows.append(["app's time for the calls", f"{app_s:.1f} s ({calls / app_s:.0f} calls/s)"])
    if flushed:
        rows.append(["until flush() True (all landed)", f"{landed_s:.0f} s ({rate:.1f} calls/s landed)"])
    else:
        steady = steady_rate(progress.points, app_s) or (found.finished_runs / landed_s)
        projected = app_s + (calls - found.finished_runs) / steady if steady > 0 else float("inf")
        rows.append(["flush() after the bound", f"False at {landed_s:.0f} s: {found.finished_runs} landed"])
        rows.append(
            ["PROJECTED until all landed", f"{projected:.0f} s (at the measured {steady:.1f} calls/s)"]
        )
    rows.append(["peak RSS, app process (VmHWM)", f"{app_peak:.0f} MiB (includes the OpenAIServer)"])
    if args.writer == "process":
        shown = (
            f"{writer_peak:.0f} MiB" if writer_peak else f"{progress.peak_writer_rss_mb:.0f} MiB (sampled)"
        )
        rows.append(["peak RSS, writer process (VmHWM)", shown])
    rows.append(["peak spool directory size (sampled)", f"{progress.peak_spool_bytes / 2**20:.0f} MiB"])
    cpu_row = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(cpu.items()) if v >= 0.5)
    rows.append(["CPU used meanwhile", cpu_row])
    verdict = "PASS" if searched == calls else "MISS"
    rows.append(
        ["runs landed (search_runs count)", f"{searched} of {calls}: {verdict} ({search_s:.0f} s to count)"]
    )
    rows.append(["cross-check in PostgreSQL", found.summary()])
    lines.append(common.table(rows))
    print("\n".join(lines))
    return 0 if searched == calls else 1


if __name__ == "__main__":
    sys.exit(main())
