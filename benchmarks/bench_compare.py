"""How fast ``genai-mlflow compare`` reads a persona's calls back: ``read_calls`` over N traces.

Run by hand (not a test); needs PostgreSQL on 127.0.0.1:5432 (trust, user postgres)::

    .venv/bin/python benchmarks/bench_compare.py --quick   # 10,000 traces, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_compare.py           # 100,000 traces, about 35 minutes
    .venv/bin/python benchmarks/bench_compare.py --no-embedded --workers 1 4 8   # the server only

Seeding is most of the time: MLflow lands about 100-150 traces/s into either store on 2 cores.

Seeds N traces of one persona over the 7 UTC days before today, half with prompt ``greeting/1`` and
half with ``greeting/2`` (an A/B test, some calls streamed, 2 % failed), as the exporter would send
them: OTLP spans with GenAI attributes and the ``genai_mlflow.*`` labels, turned into MLflow's shape by
``records.trace_request`` (root ``mlflow.traceTag.*`` attributes, ``mlflow.llm.cost``), 100 traces per
request, into:

- the MLflow server of the integration tests (``tests/mlflow_stack.py``: ``mlflow server --workers 2``
  on PostgreSQL, artifacts on moto S3), posted straight to ``/v1/traces`` from 4 threads;
- an embedded sqlite store, through the exporter's ``StoreGateway`` (MLflow's ``log_spans``).

Then times ``read_calls(..., by="prompt_version")`` on each, best and median of ``--repeat`` runs, with
CPU seconds of this process, the MLflow server and its PostgreSQL backends, and on the server the
requests made (median latency, and their sum over threads). On the server it reads once before
``ANALYZE`` and then after it (see ``analyze``). The goal is 100,000 calls in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

import bench_exporter_common as common
from genai_mlflow import semconv as sc
from genai_mlflow.compare import reader
from genai_mlflow.compare.reader import read_calls
from genai_mlflow.exporter import records
from genai_mlflow.exporter.gateway import Gateway, RestGateway, StoreGateway
from genai_mlflow.exporter.pricing import PriceTable

BATCH = 100  # traces per OTLP request, as mode window sends them
SEED_THREADS = 4  # MLflow's ingest ceiling is reached by about 4 (docs: bench_landing's ceiling)
DAYS = 7
PROMPTS = ("greeting/1", "greeting/2")
MODEL = "gpt-4o-mini"
GOAL_S = 10.0  # "100,000 calls in seconds": read in under 10 s


@dataclass(frozen=True)
class Day:
    day: datetime  # 00:00 UTC
    count: int
    experiment: str


def _kv(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=records.to_any_value(value))


def batch_request(persona: str, day: datetime, seed: int, count: int) -> ExportTraceServiceRequest:
    """``count`` one-span traces on ``day``, as the exporter sends them to MLflow."""
    rng = np.random.default_rng(seed)
    start0 = int(day.timestamp() * 1e9)
    starts = np.sort(rng.integers(0, 86_400 * 10**9, size=count)) + start0
    versions = rng.integers(0, 2, size=count)
    streamed = rng.random(count) < 0.5
    failed = rng.random(count) < 0.02
    input_tokens = rng.integers(200, 900, size=count)
    output_tokens = rng.integers(20, 400, size=count) - versions * 15
    latency_ns = (rng.lognormal(6.6, 0.4, size=count) - versions * 40).clip(50) * 1e6
    ttft_s = rng.lognormal(-1.5, 0.3, size=count)
    otlp = ExportTraceServiceRequest()
    resource_spans = otlp.resource_spans.add()
    resource_spans.resource.attributes.extend([_kv(sc.SERVICE_NAME, "bench-compare")])
    spans = resource_spans.scope_spans.add().spans
    for i in range(count):
        version = int(versions[i])
        prompt = PROMPTS[version]
        attrs = [
            _kv(sc.GEN_AI_OPERATION_NAME, "chat"),
            _kv(sc.GEN_AI_PROVIDER_NAME, "openai"),
            _kv(sc.GEN_AI_REQUEST_MODEL, MODEL),
            _kv(sc.GEN_AI_RESPONSE_MODEL, MODEL + "-2024-07-18"),
            _kv(sc.GEN_AI_AGENT_NAME, persona),
            _kv(sc.GENAI_MLFLOW_PROMPTS, prompt),
            _kv(sc.GENAI_MLFLOW_PROMPT_NAME, "greeting"),
            _kv(sc.GENAI_MLFLOW_PROMPT_VERSION, prompt.rsplit("/", 1)[1]),
            _kv(sc.GENAI_MLFLOW_AB_TEST, "greeting-test"),
            _kv(sc.GENAI_MLFLOW_VARIANT, ("control", "treatment")[version]),
            _kv(sc.GENAI_MLFLOW_APP_VERSION, "1.4.0"),
        ]
        if failed[i]:
            attrs.append(_kv(sc.ERROR_TYPE, "RateLimitError"))
        else:
            attrs += [
                _kv(sc.GEN_AI_USAGE_INPUT_TOKENS, int(input_tokens[i])),
                _kv(sc.GEN_AI_USAGE_OUTPUT_TOKENS, int(output_tokens[i])),
                _kv(sc.GEN_AI_RESPONSE_FINISH_REASONS, ["stop"]),
            ]
            if streamed[i]:
                attrs.append(_kv(sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, float(ttft_s[i])))
        span = spans.add(
            trace_id=rng.bytes(16),
            span_id=rng.bytes(8),
            name=f"chat {MODEL}",
            kind=Span.SPAN_KIND_CLIENT,
            start_time_unix_nano=int(starts[i]),
            end_time_unix_nano=int(starts[i] + latency_ns[i]),
        )
        span.attributes.extend(attrs)
        if failed[i]:
            span.status.code = Status.STATUS_CODE_ERROR
    request, _ = records.trace_request(records.local_traces(otlp), PRICES)
    return request


PRICES = PriceTable.load()


def plan(persona: str, total: int, today: datetime) -> list[Day]:
    per_day = [total // DAYS + (1 if i < total % DAYS else 0) for i in range(DAYS)]
    days = []
    for i, count in enumerate(per_day):
        day = today - timedelta(days=DAYS - i)
        days.append(Day(day, count, records.experiment_name(persona, day.date())))
    return days


def batches(days: list[Day]) -> Iterator[tuple[Day, int, int]]:
    """(day, seed, count) per request: the same traces for every store."""
    seed = 0
    for day in days:
        for first in range(0, day.count, BATCH):
            seed += 1
            yield day, seed, min(BATCH, day.count - first)


def seed(gateway: Gateway, persona: str, days: list[Day], threads: int) -> tuple[float, float]:
    """Seconds to land every trace, and of those the seconds spent building requests."""
    ids = {
        d.experiment: gateway.experiment_id(d.experiment, records.experiment_tags(persona, d.day.date()))
        for d in days
    }
    built = 0.0
    lock = threading.Lock()

    def post(day: Day, batch_seed: int, count: int) -> None:
        nonlocal built
        started = time.perf_counter()
        request = batch_request(persona, day.day, batch_seed, count)
        spent = time.perf_counter() - started
        with lock:
            built += spent
        gateway.post_traces(ids[day.experiment], None, request)

    started = time.perf_counter()
    if threads == 1:
        for args in batches(days):
            post(*args)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(post, *args) for args in batches(days)]:
                future.result()
    return time.perf_counter() - started, built


def analyze(db_url: str) -> str:
    """ANALYZE the stack's database, as autovacuum would after a bulk load; its autovacuum setting."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SHOW autovacuum").fetchone()
        conn.execute("ANALYZE")
    return str(row[0]) if row else "unknown"


# ------------------------------------------------------------------------------------------------
# Reads


class PostTimer:
    """Time spent in ``_RestSource._post`` (request, server, JSON decoding), summed over threads."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._lock = threading.Lock()
        self._original: Callable[..., Any] = reader._RestSource._post

    def __enter__(self) -> PostTimer:
        original = self._original

        def timed(source: Any, path: str, body: dict[str, Any]) -> Any:
            started = time.perf_counter()
            try:
                return original(source, path, body)
            finally:
                with self._lock:
                    self.samples.append(time.perf_counter() - started)

        reader._RestSource._post = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        reader._RestSource._post = self._original  # type: ignore[method-assign]


@dataclass
class Read:
    seconds: float
    calls: int
    unlabelled: int
    cpu: dict[str, float]
    requests: int = 0
    request_median_ms: float = 0.0
    request_busy_s: float = 0.0


def timed_read(
    uri: str, persona: str, since: datetime, until: datetime, stack: Any, workers: int, **kwargs: Any
) -> Read:
    meter = common.CpuMeter(stack)
    meter.start()
    with PostTimer() as posts:
        started = time.perf_counter()
        calls = read_calls(uri, persona, since=since, until=until, workers=workers, **kwargs)
        seconds = time.perf_counter() - started
    cpu = meter.stop()
    samples = posts.samples
    return Read(
        seconds,
        len(calls.samples),
        calls.unlabelled,
        cpu,
        len(samples),
        statistics.median(samples) * 1000 if samples else 0.0,
        sum(samples),
    )


def rounds(label: str, repeat: int, run: Callable[[], Read], expected: int) -> list[str]:
    reads = [run() for _ in range(repeat)]
    best = min(reads, key=lambda r: r.seconds)
    median = statistics.median(r.seconds for r in reads)
    ok = all(r.calls == expected for r in reads)
    cpu = best.cpu
    requests = (
        f"{best.requests} ({best.request_median_ms:.0f} ms median, {best.request_busy_s:.1f} s summed)"
        if best.requests
        else "-"
    )
    return [
        label,
        f"{best.seconds:.2f}",
        f"{median:.2f}",
        f"{best.calls / best.seconds:,.0f}",
        f"{best.calls:,}" + ("" if ok else f" (want {expected:,})"),
        f"{cpu.get('app', 0.0):.1f}",
        f"{cpu.get('mlflow', 0.0):.1f}",
        f"{cpu.get('postgres', 0.0):.1f}",
        requests,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10,000 traces instead of 100,000")
    parser.add_argument("--traces", type=int, help="how many traces to seed")
    parser.add_argument("--repeat", type=int, default=3, help="reads per configuration (best and median)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[8], help="read_calls workers to try on the server"
    )
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--no-embedded", action="store_true")
    args = parser.parse_args()
    total = args.traces or (10_000 if args.quick else 100_000)
    common.quiet_logs()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since, until = today - timedelta(days=DAYS), today
    persona = common.new_persona("compare")
    days = plan(persona, total, today)
    print(f"# bench_compare: {total:,} traces of one persona over {DAYS} days, 2 prompt versions")
    print(f"# {common.versions()}; {common.load_note()}")
    header = [
        "store",
        "best s",
        "median s",
        "calls/s",
        "calls",
        "app CPU s",
        "mlflow CPU s",
        "pg CPU s",
        "requests",
    ]
    table = [header]
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        if not args.no_embedded:
            uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
            old = os.getcwd()
            os.chdir(tmp)  # the store's default artifact root is ./mlruns
            try:
                seconds, built = seed(StoreGateway(uri), persona, days, 1)
            finally:
                os.chdir(old)
            print(
                f"seeded embedded sqlite: {total:,} traces in {seconds:.1f} s = {total / seconds:,.0f} "
                f"traces/s (building the OTLP requests: {built:.1f} s of it)"
            )
            table.append(
                rounds(
                    "embedded sqlite",
                    args.repeat,
                    lambda: timed_read(uri, persona, since, until, None, 8, by="prompt_version"),
                    total,
                )
            )
            print(common.table(table), flush=True)
        if not args.no_server:
            with common.running_stack(Path(tmp) / "stack") as stack:
                print(common.stack_description(stack))
                seconds, built = seed(RestGateway(stack.tracking_uri), persona, days, SEED_THREADS)
                print(
                    f"seeded server: {total:,} traces in {seconds:.1f} s = {total / seconds:,.0f} traces/s "
                    f"({SEED_THREADS} threads, {BATCH} traces per OTLP request; building: {built:.1f} s "
                    "summed over threads)"
                )

                def server_read(workers: int, **kwargs: Any) -> Read:
                    return timed_read(stack.tracking_uri, persona, since, until, stack, workers, **kwargs)

                # PostgreSQL plans the trace_tags lookups of traces/search from table statistics: on
                # tables never analyzed (autovacuum off, as on the development machine) it scans all
                # of trace_tags for every page. Read once like that, then as autovacuum would leave it.
                table.append(
                    rounds(
                        f"server, {args.workers[-1]} threads, before ANALYZE",
                        1,
                        lambda: server_read(args.workers[-1], by="prompt_version"),
                        total,
                    )
                )
                print(
                    f"PostgreSQL autovacuum: {analyze(stack.db_url)}; ANALYZE run after seeding", flush=True
                )
                for workers in args.workers:
                    table.append(
                        rounds(
                            f"server, {workers} threads",
                            args.repeat,
                            lambda w=workers: server_read(w, by="prompt_version"),  # type: ignore[misc]
                            total,
                        )
                    )
                    print(common.table(table), flush=True)
                table.append(
                    rounds(
                        "server, by variant, --test",
                        1,
                        lambda: server_read(args.workers[-1], by="variant", test="greeting-test"),
                        total,
                    )
                )
    print()
    print(common.table(table))
    best = {row[0]: float(row[1]) for row in table[1:]}
    scale = 100_000 / total
    for label, seconds in best.items():
        projected = seconds * scale
        verdict = "pass" if projected <= GOAL_S else "miss"
        note = "" if scale == 1 else f" (projected to 100,000: {projected:.1f} s)"
        print(f"goal <= {GOAL_S:.0f} s per 100,000 calls, {label}: {seconds:.2f} s{note}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
