"""Landing throughput: LLM calls that land fully in MLflow (a run and its linked trace) per second.

Run by hand (not a test); needs PostgreSQL on 127.0.0.1:5432 (trust, user postgres)::

    .venv/bin/python benchmarks/bench_landing.py            # 3 rounds, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_landing.py --quick    # 1 small round, about 3 minutes

Everything runs on this machine: the stack of the integration tests (``tests/mlflow_stack.py``: ``mlflow
server --workers 2`` on PostgreSQL, artifacts on moto S3) and the in-process ``OpenAIServer``. The real
``openai`` client makes N calls as fast as one thread can; the figure is N divided by the time from the
first call to ``handle.flush()`` returning True. Contenders, measured in the same run, in alternating
order:

- ``seed``: the seed's way, per call and sequentially, ``mlflow.set_experiment``, ``mlflow.start_run``,
  ``mlflow.log_params``, ``mlflow.log_metrics`` and the end of the run (no trace);
- ``call`` and ``window``: ``genai_mlflow.instrument(mode=...)``, writer thread, 8 workers;
- with ``--diagnostics`` (no goal): the same two, waited for by polling ``handle.pipeline.writer.landed``
  every 50 ms instead of calling ``flush()``, which isolates what ``flush()`` itself costs (a busy
  ``flush()`` once cut mode ``call`` from 12 to 2.5 calls/s here);
- MLflow's own ceiling, with 8 threads of plain ``requests`` and no app: one-span OTLP traces
  (``/v1/traces``, no run), bare ``runs/create``, and the four requests mode ``call`` makes per call.

What landed is checked in PostgreSQL after each block (runs, finished runs, traces, traces linked to
a run, ``latency_ms`` steps), and CPU time per call of the app, the MLflow server and PostgreSQL is
read from ``/proc``. The writer's MLflow requests are timed (wrappers on the gateway class) to show
where its time goes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import bench_exporter_common as common
import genai_mlflow
from genai_mlflow.exporter import records
from genai_mlflow.exporter.gateway import RestGateway
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.processor import encode
from genai_mlflow.exporter.spool import Spool
from genai_mlflow.testing.openai_server import OpenAIServer

GOALS = {"call": 5.0, "window": 30.0}  # x seed
SEED_REFERENCE = 2.7  # calls/s, the seed's rate as measured before this benchmark existed
CEILING_THREADS = 8
WRITER_WORKERS = 8
POLL_S = 0.05
LINK_BATCH = 50  # traces per OTLP request in the link-to-run alternative
WINDOW_BATCH = 100  # traces per OTLP request, as mode window sends them
REQUEST_LABELS = ("create_run", "post_traces", "log_batch", "end_run", "experiment_id", "find_run")


@dataclass
class Sizes:
    seed: int
    call: int
    window: int
    ceiling: int
    rounds: int


@dataclass
class Result:
    calls: int
    app_s: float
    total_s: float
    ok: bool
    check: str
    cpu: dict[str, float] = field(default_factory=dict)
    drain_cycles: int = 0
    timings: dict[str, list[float]] = field(default_factory=dict)
    posts_at_once: int = 0  # the most OTLP requests of the writer in flight together

    @property
    def rate(self) -> float:
        return self.calls / self.total_s


@dataclass
class Bench:
    stack: common.MlflowStack
    client: Any
    tmp: Path
    timings: common.RequestTimings
    otlp_template: ExportTraceServiceRequest
    run_template: records.RunRecord
    results: dict[str, list[Result]] = field(default_factory=dict)

    def cpu_meter(self) -> common.CpuMeter:
        return common.CpuMeter(self.stack)

    def record(self, label: str, result: Result) -> None:
        self.results.setdefault(label, []).append(result)


# ------------------------------------------------------------------------------------------------
# Contenders


def seed_block(bench: Bench, calls: int) -> Result:
    import mlflow

    mlflow.set_tracking_uri(bench.stack.tracking_uri)
    persona = common.new_persona("seed")
    experiment = common.experiment_of(persona)
    meter = bench.cpu_meter()
    meter.start()
    started = time.perf_counter()
    for i in range(calls):
        call_started = time.perf_counter()
        response = common.chat(bench.client, i)
        latency_ms = (time.perf_counter() - call_started) * 1000
        usage = response.usage
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=f"chat {common.MODEL}"):
            mlflow.log_params(
                {"model": response.model, "persona": persona, "temperature": 0.2, "max_tokens": 200}
            )
            mlflow.log_metrics(
                {
                    "prompt_tokens": usage.prompt_tokens if usage else 0,
                    "completion_tokens": usage.completion_tokens if usage else 0,
                    "total_tokens": usage.total_tokens if usage else 0,
                    "latency_ms": latency_ms,
                }
            )
    total = time.perf_counter() - started
    cpu = meter.stop()
    found = common.landed(bench.stack.db_url, experiment)
    ok = found.runs == found.finished_runs == calls
    return Result(calls, total, total, ok, f"runs {found.runs}/{calls}", cpu)


def exporter_block(bench: Bench, mode: str, calls: int, *, use_flush: bool) -> Result:
    spool_dir = bench.tmp / f"spool-{mode}-{uuid.uuid4().hex[:8]}"
    handle = genai_mlflow.instrument(
        bench.stack.tracking_uri, mode=mode, spool_dir=str(spool_dir), workers=WRITER_WORKERS
    )
    assert handle.pipeline is not None
    writer = handle.pipeline.writer
    persona = common.new_persona(mode)
    timeout = 120.0 + calls * 2.0
    bench.timings.reset()
    meter = bench.cpu_meter()
    meter.start()
    started = time.perf_counter()
    with genai_mlflow.persona(persona):
        for i in range(calls):
            common.chat(bench.client, i)
    app_s = time.perf_counter() - started
    if use_flush:
        ok = handle.flush(timeout)
    else:
        deadline = time.monotonic() + timeout
        while writer.landed < calls and time.monotonic() < deadline:
            time.sleep(POLL_S)
        ok = writer.landed >= calls
    total = time.perf_counter() - started
    cpu = meter.stop()
    timings = {k: list(v) for k, v in bench.timings.samples.items()}
    posts_at_once = bench.timings.most_at_once("post_traces")
    handle.shutdown()
    found = common.landed(bench.stack.db_url, common.experiment_of(persona))
    complete = found.complete_call_mode(calls) if mode == "call" else found.complete_window_mode(calls)
    if mode == "call":
        check = f"runs {found.finished_runs}/{calls}, linked traces {found.linked_traces}/{calls}"
    else:
        check = (
            f"runs {found.runs}, steps {found.latency_steps}/{calls}, "
            f"linked traces {found.linked_traces}/{calls}"
        )
    drain_cycles = len(timings.pop("spool.read", []))
    return Result(calls, app_s, total, ok and complete, check, cpu, drain_cycles, timings, posts_at_once)


# ------------------------------------------------------------------------------------------------
# MLflow's ceiling: plain requests, 8 threads, no app


def _fresh_ids(template: ExportTraceServiceRequest) -> tuple[ExportTraceServiceRequest, str]:
    request = ExportTraceServiceRequest()
    request.CopyFrom(template)
    trace_id = os.urandom(16)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.trace_id = trace_id
                span.span_id = os.urandom(8)
    return request, trace_id.hex()


def hammer(
    count: int,
    threads: int,
    one: Callable[[requests.Session], object],
    finish: Callable[[requests.Session], object] | None = None,
) -> tuple[float, int]:
    """``count`` calls of ``one`` spread over ``threads`` threads, then ``finish`` once per thread;
    (seconds, errors)."""
    counter = itertools.count()
    errors = [0]
    lock = threading.Lock()

    def work() -> None:
        with requests.Session() as session:
            while next(counter) < count:
                try:
                    one(session)
                except Exception:
                    with lock:
                        errors[0] += 1
            if finish is not None:
                try:
                    finish(session)
                except Exception:
                    with lock:
                        errors[0] += 1

    workers = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - started, errors[0]


def _check(response: requests.Response) -> Any:
    response.raise_for_status()
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return None


def _create_experiment(base: str) -> str:
    body = {"name": f"bench_ceiling_{uuid.uuid4().hex[:8]}"}
    return str(_check(requests.post(f"{base}/api/2.0/mlflow/experiments/create", json=body))["experiment_id"])


def ceiling_block(bench: Bench, what: str, count: int) -> Result:
    base = bench.stack.tracking_uri
    api = f"{base}/api/2.0/mlflow"
    experiment_id = _create_experiment(base)
    run = bench.run_template

    def post_trace(session: requests.Session, run_id: str | None) -> None:
        request, _ = _fresh_ids(bench.otlp_template)
        headers = {"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id}
        if run_id is not None:
            headers["x-mlflow-run-id"] = run_id
        _check(session.post(f"{base}/v1/traces", data=request.SerializeToString(), headers=headers))

    def create_run(session: requests.Session) -> str:
        body: dict[str, Any] = {
            "experiment_id": experiment_id,
            "user_id": "bench",
            "run_name": run.run_name,
            "start_time": run.start_ms,
            "tags": [{"key": k, "value": v} for k, v in run.tags.items()],
        }
        return str(_check(session.post(f"{api}/runs/create", json=body))["run"]["info"]["run_id"])

    def four_requests(session: requests.Session) -> None:
        run_id = create_run(session)
        post_trace(session, run_id)
        metrics = [{"key": k, "value": v, "timestamp": run.end_ms, "step": 0} for k, v in run.metrics.items()]
        params = [{"key": k, "value": v} for k, v in run.params.items()]
        body: dict[str, Any] = {"run_id": run_id, "params": params, "metrics": metrics, "tags": []}
        _check(session.post(f"{api}/runs/log-batch", json=body))
        update: dict[str, Any] = {"run_id": run_id, "status": "FINISHED", "end_time": run.end_ms}
        _check(session.post(f"{api}/runs/update", json=update))

    local = threading.local()

    def runs_then_link(session: requests.Session) -> None:
        """The run's three requests now; the trace waits for a batch, then is linked to its run."""
        run_id = create_run(session)
        metrics = [{"key": k, "value": v, "timestamp": run.end_ms, "step": 0} for k, v in run.metrics.items()]
        params = [{"key": k, "value": v} for k, v in run.params.items()]
        body: dict[str, Any] = {"run_id": run_id, "params": params, "metrics": metrics, "tags": []}
        _check(session.post(f"{api}/runs/log-batch", json=body))
        update: dict[str, Any] = {"run_id": run_id, "status": "FINISHED", "end_time": run.end_ms}
        _check(session.post(f"{api}/runs/update", json=update))
        batch: list[tuple[ExportTraceServiceRequest, str, str]] = local.__dict__.setdefault("batch", [])
        request, trace_hex = _fresh_ids(bench.otlp_template)
        batch.append((request, trace_hex, run_id))
        if len(batch) >= LINK_BATCH:
            post_and_link(session)

    def post_and_link(session: requests.Session) -> None:
        batch: list[tuple[ExportTraceServiceRequest, str, str]] = local.__dict__.get("batch", [])
        if not batch:
            return
        merged = ExportTraceServiceRequest()
        for request, _, _ in batch:
            merged.resource_spans.extend(request.resource_spans)
        headers = {"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id}
        _check(session.post(f"{base}/v1/traces", data=merged.SerializeToString(), headers=headers))
        for _, trace_hex, run_id in batch:
            link = {"trace_ids": [f"tr-{trace_hex}"], "run_id": run_id}
            _check(session.post(f"{api}/traces/link-to-run", json=link))
        batch.clear()

    def post_batch(session: requests.Session, run_id: str) -> None:
        """What mode window sends: WINDOW_BATCH traces in one request, linked to the window's run."""
        merged = ExportTraceServiceRequest()
        for _ in range(WINDOW_BATCH):
            merged.resource_spans.extend(_fresh_ids(bench.otlp_template)[0].resource_spans)
        headers = {
            "Content-Type": "application/x-protobuf",
            "x-mlflow-experiment-id": experiment_id,
            "x-mlflow-run-id": run_id,
        }
        _check(session.post(f"{base}/v1/traces", data=merged.SerializeToString(), headers=headers))

    threads = CEILING_THREADS
    requests_count = count
    one: Callable[[requests.Session], object]
    finish: Callable[[requests.Session], object] | None = None
    if what.startswith("batch"):
        with requests.Session() as session:
            window_run = create_run(session)
        threads = int(what.removeprefix("batch"))
        requests_count = max(1, count // WINDOW_BATCH)
        count = requests_count * WINDOW_BATCH
        one = lambda session: post_batch(session, window_run)  # noqa: E731
    elif what == "otlp":
        one = lambda session: post_trace(session, None)  # noqa: E731
    elif what == "runs":
        one = create_run
    elif what == "linked":
        one, finish = runs_then_link, post_and_link
    else:
        one = four_requests
    meter = bench.cpu_meter()
    meter.start()
    seconds, errors = hammer(requests_count, threads, one, finish)
    cpu = meter.stop()
    return Result(count, seconds, seconds, errors == 0, f"errors {errors}", cpu)


# ------------------------------------------------------------------------------------------------
# Set-up


def templates(client: Any) -> tuple[ExportTraceServiceRequest, records.RunRecord]:
    """What the writer would post for one instrumented call: its OTLP request and its run."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = genai_mlflow.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider, capture_content=True)
    try:
        with genai_mlflow.persona("bench_ceiling"):
            common.chat(client, 0)
    finally:
        instrumentor.uninstrument()
    spans = exporter.get_finished_spans()
    [trace] = records.local_traces(ExportTraceServiceRequest.FromString(encode(spans)))
    prices = PriceTable.load()
    request, _ = records.trace_request([trace], prices)
    return request, records.run_record(trace, prices)


def ceiling_runner(name: str, count: int) -> Callable[[Bench], Result]:
    """A ceiling contender; the batched ones send five times as many traces (in 1/100 the requests)."""
    scaled = count * 5 if name.startswith("batch") else count
    return lambda bench: ceiling_block(bench, name, scaled)


def warm_up(bench: Bench) -> None:
    """First requests of each server worker (imports, caches) and of each path, untimed."""
    seed_block(bench, 4)
    for mode in ("call", "window"):
        exporter_block(bench, mode, 10, use_flush=True)
    ceiling_block(bench, "four", 16)


# ------------------------------------------------------------------------------------------------
# Report


def _median(results: list[Result], key: Callable[[Result], float]) -> float:
    return statistics.median(key(r) for r in results)


def _cpu_ms(results: list[Result], group: str) -> str:
    values = [r.cpu.get(group, 0.0) * 1000 / r.calls for r in results if r.cpu]
    return f"{statistics.median(values):.1f}" if values else "-"


def _rounds(results: list[Result]) -> str:
    return " / ".join(f"{r.rate:.1f}" for r in results)


CONTENDER_NAMES = {
    "seed": "seed: fluent API per call",
    "call": "exporter mode call",
    "window": "exporter mode window",
    "call-poll": "diag: call, no flush()",
    "window-poll": "diag: window, no flush()",
}
CEILING_NAMES = {
    "otlp": "OTLP /v1/traces, 1-span trace, no run",
    "runs": "runs/create",
    "four": "mode call's 4 requests (run+linked trace)",
    "linked": f"alt: 3 run requests + link-to-run, OTLP {LINK_BATCH}/request",
    "batch1": f"OTLP {WINDOW_BATCH}-trace requests, linked, 1 thread (as mode window)",
    "batch4": f"OTLP {WINDOW_BATCH}-trace requests, linked, 4 threads",
}


def report(bench: Bench, sizes: Sizes, quick: bool, elapsed: float) -> str:
    results = bench.results
    seed = _median(results["seed"], lambda r: r.rate) if results.get("seed") else float("nan")
    lines = [
        f"Landing throughput ({'quick' if quick else 'full'} run, {sizes.rounds} round(s), "
        f"{elapsed:.0f} s in all)",
        common.versions(),
        common.load_note(),
        common.stack_description(bench.stack),
        "app: real openai client -> in-process OpenAIServer, one thread, calls back to back;",
        f"writer: thread, {WRITER_WORKERS} workers; rate = calls / (first call .. flush() True)",
        f"goals: call >= {GOALS['call']:.0f}x seed, window >= {GOALS['window']:.0f}x seed, against the seed "
        f"measured in this run\n(x {SEED_REFERENCE}/s: against the seed's rate as first reported)",
        "",
    ]
    header = [
        "contender",
        "calls",
        "app s",
        "land s",
        "calls/s",
        "x seed",
        f"x {SEED_REFERENCE}/s",
        "rounds calls/s",
    ]
    header += ["app", "mlflow", "pg", "landed", "goal"]
    rows = [header]
    for label, name in CONTENDER_NAMES.items():
        series = results.get(label)
        if not series:
            continue
        rate = _median(series, lambda r: r.rate)
        ratio = rate / seed
        mode = label.split("-")[0]
        goal = "-"
        if label in GOALS:
            goal = f"{'PASS' if ratio >= GOALS[mode] else 'MISS'} (>= {GOALS[mode]:.0f}x)"
        ok = all(r.ok for r in series)
        rows.append(
            [
                name,
                str(series[0].calls),
                f"{_median(series, lambda r: r.app_s):.1f}",
                f"{_median(series, lambda r: r.total_s):.1f}",
                f"{rate:.1f}",
                f"{ratio:.1f}" if label != "seed" else "1.0",
                f"{rate / SEED_REFERENCE:.1f}",
                _rounds(series),
                _cpu_ms(series, "app"),
                _cpu_ms(series, "mlflow"),
                _cpu_ms(series, "postgres"),
                ("ok: " if ok else "INCOMPLETE: ") + series[-1].check,
                goal,
            ]
        )
    lines.append(common.table(rows))
    lines.append(
        "  app/mlflow/pg = CPU ms per call (from /proc) of this process, the MLflow server, PostgreSQL"
    )
    if any(results.get(label) for label in CEILING_NAMES):
        lines += ceiling_lines(results)
    for label in ("call", "call-poll", "window", "window-poll"):
        series = results.get(label)
        if not series:
            continue
        lines.append("")
        lines.append(where_time_goes(CONTENDER_NAMES[label], series))
    lines.append(
        f"\nclient side, per MLflow request: mlflow's http_request resolves its request headers each "
        f"time:\n  {header_resolution_us():.0f} µs CPU per request (failed imports of Databricks "
        "modules under the import lock), 4 requests per call in mode call; the writer resolves them\n"
        "  once, on a session of its own (http_request only for credentials it cannot apply itself)"
    )
    return "\n".join(lines)


def ceiling_lines(results: dict[str, list[Result]]) -> list[str]:
    lines = [""]
    lines.append(
        f"MLflow's ceiling: {CEILING_THREADS} threads of plain requests (unless said), no app, no writer;"
        "\n  a call = one LLM call's worth: a trace, a run, or the set of requests named"
    )
    rows = [["what", "calls", "calls/s", "rounds calls/s", "client", "mlflow", "pg", "check"]]
    for label, name in CEILING_NAMES.items():
        series = results.get(label)
        if not series:
            continue
        rows.append(
            [
                name,
                str(series[0].calls),
                f"{_median(series, lambda r: r.rate):.1f}",
                _rounds(series),
                _cpu_ms(series, "app"),
                _cpu_ms(series, "mlflow"),
                _cpu_ms(series, "postgres"),
                "ok" if all(r.ok for r in series) else series[-1].check,
            ]
        )
    lines.append(common.table(rows))
    lines.append(
        "  client/mlflow/pg = CPU ms per request (or request set): client threads, MLflow, PostgreSQL"
    )
    return lines


def header_resolution_us(repeat: int = 300) -> float:
    """CPU µs of ``resolve_request_headers()``, which MLflow's ``http_request`` (the writer's REST
    client) runs on every request: its Databricks detection retries imports that fail."""
    from mlflow.tracking.request_header import registry

    resolve_request_headers: Callable[[], dict[str, str]] = registry.resolve_request_headers
    resolve_request_headers()
    started = time.thread_time()
    for _ in range(repeat):
        resolve_request_headers()
    return (time.thread_time() - started) / repeat * 1e6


def where_time_goes(name: str, series: list[Result]) -> str:
    merged: dict[str, list[float]] = {}
    for result in series:
        for key, values in result.timings.items():
            merged.setdefault(key, []).extend(values)
    timings = common.RequestTimings()
    timings.samples = merged
    rows = [["MLflow request", "count", "median ms", "p90 ms", "sum s"], *timings.rows(REQUEST_LABELS)]
    landing = sum(r.total_s for r in series)
    busy = timings.busy_s(REQUEST_LABELS)
    cycles = sum(r.drain_cycles for r in series)
    return (
        f"{name}: where the writer's time goes (all rounds)\n{common.table(rows)}\n"
        f"  worker pool busy in MLflow requests: {busy / (WRITER_WORKERS * landing):.0%} of "
        f"{WRITER_WORKERS} workers x {landing:.0f} s; drain cycles (spool reads): {cycles} "
        f"({cycles / landing:.0f}/s); OTLP requests in flight together: at most "
        f"{max(r.posts_at_once for r in series)}"
    )


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one small round")
    parser.add_argument("--rounds", type=int, help="rounds (each measures every contender once)")
    parser.add_argument("--seed-calls", type=int)
    parser.add_argument("--call-calls", type=int)
    parser.add_argument("--window-calls", type=int)
    parser.add_argument("--ceiling-count", type=int, help="requests (or request sets) per ceiling block")
    parser.add_argument(
        "--diagnostics", action="store_true", help="also wait without flush() (isolates flush()'s own cost)"
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip MLflow's ceiling")
    parser.add_argument(
        "--server-workers",
        type=int,
        default=common.DEFAULT_WORKERS,
        help="MLflow server workers (as the local stack)",
    )
    args = parser.parse_args(argv)
    common.quiet_logs()
    sizes = Sizes(
        seed=args.seed_calls or (12 if args.quick else 40),
        call=args.call_calls or (60 if args.quick else 300),
        window=args.window_calls or (300 if args.quick else 2000),
        ceiling=args.ceiling_count or (120 if args.quick else 600),
        rounds=args.rounds or (1 if args.quick else 3),
    )
    contenders: list[tuple[str, Callable[[Bench], Result]]] = [
        ("seed", lambda b: seed_block(b, sizes.seed)),
        ("call", lambda b: exporter_block(b, "call", sizes.call, use_flush=True)),
        ("window", lambda b: exporter_block(b, "window", sizes.window, use_flush=True)),
    ]
    if args.diagnostics:
        contenders += [
            ("call-poll", lambda b: exporter_block(b, "call", sizes.call, use_flush=False)),
            ("window-poll", lambda b: exporter_block(b, "window", sizes.window, use_flush=False)),
        ]
    if not args.no_ceiling:
        contenders += [(name, ceiling_runner(name, sizes.ceiling)) for name in CEILING_NAMES]

    timings = common.RequestTimings()
    timings.install(RestGateway, common.RequestTimings.GATEWAY_METHODS)
    timings.install(Spool, ("read",), prefix="spool.")
    with tempfile.TemporaryDirectory(prefix="bench-landing-") as tmp, OpenAIServer() as server:
        tmp_path = Path(tmp)
        client = common.make_client(server.base_url)
        otlp_template, run_template = templates(client)
        print("starting the MLflow stack ...", file=sys.stderr, flush=True)
        with common.running_stack(tmp_path / "stack", args.server_workers) as stack:
            bench = Bench(stack, client, tmp_path, timings, otlp_template, run_template)
            warm_up(bench)
            bench.results.clear()
            started = time.perf_counter()
            for round_no in range(sizes.rounds):
                order = contenders if round_no % 2 == 0 else list(reversed(contenders))
                for label, block in order:
                    print(f"round {round_no + 1}: {label} ...", file=sys.stderr, flush=True)
                    result = block(bench)
                    bench.record(label, result)
                    print(
                        f"  {result.calls} in {result.total_s:.1f} s = {result.rate:.1f}/s; {result.check}",
                        file=sys.stderr,
                        flush=True,
                    )
            elapsed = time.perf_counter() - started
            print(report(bench, sizes, args.quick, elapsed))
    timings.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
