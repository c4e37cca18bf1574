"""Collector benchmark: OTLP spans per second accepted and landed in MLflow, against MLflow's own
``/v1/traces`` in the same run; and the collector's memory while MLflow is down under load.

Run by hand (not a test); needs PostgreSQL on 127.0.0.1:5432 (trust, user postgres)::

    .venv/bin/python benchmarks/bench_collector.py            # about 12-15 minutes on 2 cores
    .venv/bin/python benchmarks/bench_collector.py --quick    # about 4 minutes

Everything runs on this machine: the stack of the integration tests (``tests/mlflow_stack.py``, which
is ``genai-mlflow stack``'s: ``mlflow server --workers 2`` on PostgreSQL, artifacts on moto S3 or
MinIO) and ``genai-mlflow collector`` in a subprocess, started as the stack starts it. The spans are
app-like traces (a web request span, an LLM call and three other children), 100 traces (500 spans)
per OTLP/HTTP protobuf request, as an SDK's batch exporter sends them, from 4 sender threads. Phases:

1. ``collector/call`` and ``collector/window``: a fresh collector in each mode; *accepted* is spans
   over the time until every request was answered 200, *landed* is spans over the time until the
   writer reports every trace landed (``genai_collector_traces_landed_total``).
2. ``mlflow-direct``: the same number of spans, in the same requests, posted straight to MLflow's
   ``/v1/traces`` (traces only: no runs, no params, no metrics), the ceiling MLflow sets.
3. ``outage``: MLflow stopped for ``--outage-s`` (60) while senders offer ``--rate`` (5,000)
   spans/s to a fresh collector with a small spool bound; its RSS is sampled every 0.5 s.
   Goal: flat, bounded by configuration (requests in flight x body limit, plus the held spans);
   past the spool's high-water mark the collector answers 503 and the senders keep the spans.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from genai_mlflow import stack as local_stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.mlflow_stack import MlflowStack, mlflow_stack

SENDERS = 4
TRACES_PER_REQUEST = 100
SPANS_PER_TRACE = 5
GOAL_ACCEPTED = 5000.0  # spans/s
WRITER_WORKERS = 8  # GENAI_MLFLOW_WORKERS' default


def _kv(key: str, value: object) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


class RequestFactory:
    """OTLP requests of app-like traces. A template is built once; each request is the template
    with fresh trace ids swapped into its bytes, so that every trace is new and building is cheap."""

    def __init__(self, persona: str) -> None:
        self._placeholders: list[bytes] = []
        request = ExportTraceServiceRequest()
        rs = request.resource_spans.add()
        rs.resource.attributes.extend([_kv("service.name", "bench-app"), _kv("gen_ai.agent.name", persona)])
        ss = rs.scope_spans.add()
        ss.scope.name = "bench"
        start = time.time_ns()
        for _ in range(TRACES_PER_REQUEST):
            trace_id = os.urandom(16)
            self._placeholders.append(trace_id)
            root = Span(
                trace_id=trace_id, span_id=os.urandom(8), name="POST /ask", kind=Span.SPAN_KIND_SERVER
            )
            root.start_time_unix_nano, root.end_time_unix_nano = start, start + 900_000_000
            root.flags = 0x101
            root.attributes.extend([_kv("http.route", "/ask"), _kv("http.response.status_code", 200)])
            spans = [root]
            for name, offset in (("SELECT user", 1), ("GET cache", 2), ("render", 800)):
                child = Span(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=root.span_id, name=name)
                child.start_time_unix_nano = start + offset * 1_000_000
                child.end_time_unix_nano = child.start_time_unix_nano + 5_000_000
                child.flags = 0x101
                child.attributes.append(_kv("db.system", "postgresql"))
                spans.append(child)
            llm = Span(
                trace_id=trace_id, span_id=os.urandom(8), parent_span_id=root.span_id, name="chat gpt-4o-mini"
            )
            llm.kind = Span.SPAN_KIND_CLIENT
            llm.start_time_unix_nano, llm.end_time_unix_nano = start + 10_000_000, start + 790_000_000
            llm.flags = 0x101
            llm.attributes.extend(
                [
                    _kv("gen_ai.operation.name", "chat"),
                    _kv("gen_ai.provider.name", "openai"),
                    _kv("gen_ai.request.model", "gpt-4o-mini"),
                    _kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
                    _kv("gen_ai.usage.input_tokens", 42),
                    _kv("gen_ai.usage.output_tokens", 17),
                    _kv(
                        "gen_ai.input.messages",
                        '[{"role":"user","parts":[{"type":"text","content":"What is 2+2?"}]}]',
                    ),
                    _kv(
                        "gen_ai.output.messages",
                        '[{"role":"assistant","parts":[{"type":"text","content":"4"}],"finish_reason":"stop"}]',
                    ),
                ]
            )
            spans.insert(2, llm)
            ss.spans.extend(spans)
        self._template: bytes = request.SerializeToString()
        self.spans_per_request = TRACES_PER_REQUEST * SPANS_PER_TRACE

    def make(self) -> bytes:
        body = self._template
        for placeholder in self._placeholders:
            body = body.replace(placeholder, os.urandom(16))
        return body


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Collector:
    child: local_stack.Child

    @property
    def url(self) -> str:
        return self.child.url

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def mlflow_calls(self) -> dict[str, tuple[int, float]]:
        """Per writer operation: (MLflow calls, seconds spent in them), from the latency histogram."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        found: dict[str, list[float]] = {}
        for line in text.splitlines():
            for suffix, index in (("_count", 0), ("_sum", 1)):
                prefix = f'genai_collector_mlflow_request_duration_seconds{suffix}{{operation="'
                if line.startswith(prefix):
                    operation = line[len(prefix) :].split('"', 1)[0]
                    found.setdefault(operation, [0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
        return {op: (int(count), total) for op, (count, total) in found.items()}

    def rss_mib(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MiB."""
        values = {}
        for line in Path(f"/proc/{self.child.popen.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, number, _ = line.split()
                values[key] = int(number) / 1024
        return values["VmRSS:"], values["VmHWM:"]

    def stop(self) -> None:
        self.child.stop(30)


def start_collector(
    stack: MlflowStack,
    workdir: Path,
    mode: str,
    spool_max_bytes: int,
    extra_env: dict[str, str] | None = None,
) -> Collector:
    child = local_stack.start_collector(
        stack.tracking_uri,
        spool_dir=workdir / "spool",
        log_path=workdir / "collector.log",
        args=["--host", "127.0.0.1", "--grace", "2"],
        env={
            **stack.env,
            "GENAI_MLFLOW_MODE": mode,
            "GENAI_MLFLOW_SPOOL_MAX_BYTES": str(spool_max_bytes),
            **(extra_env or {}),
        },
    )
    return Collector(child)


# --- load ------------------------------------------------------------------------------------------


@dataclass
class Sent:
    elapsed_s: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    retries: int = 0


def post_all(url: str, bodies: list[bytes], headers: dict[str, str]) -> Sent:
    """Every body posted until accepted (429/503 retried after a short wait), by SENDERS threads."""
    result = Sent()
    lock = threading.Lock()
    queue = list(reversed(bodies))

    def worker() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            while True:
                response = session.post(url, data=body, headers=headers, timeout=120)
                with lock:
                    result.statuses[response.status_code] += 1
                if response.status_code in (429, 503):
                    with lock:
                        result.retries += 1
                    time.sleep(0.05)
                    continue
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
                break

    threads = [threading.Thread(target=worker) for _ in range(SENDERS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.elapsed_s = time.perf_counter() - started
    return result


def wait_landed(collector: Collector, traces: int, started: float, timeout_s: float) -> float | None:
    """Seconds from ``started`` until the writer landed ``traces`` traces, or None at the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if collector.metric("genai_collector_traces_landed_total") >= traces:
            return time.perf_counter() - started
        time.sleep(0.25)
    return None


# --- phases ----------------------------------------------------------------------------------------


def collector_phase(
    stack: MlflowStack, tmp: Path, mode: str, requests_n: int, timeout_s: float
) -> dict[str, object]:
    factory = RequestFactory(f"bench_{mode}_{uuid.uuid4().hex[:6]}")
    bodies = [factory.make() for _ in range(requests_n)]
    spans = requests_n * factory.spans_per_request
    traces = requests_n * TRACES_PER_REQUEST
    collector = start_collector(stack, tmp / f"collector-{mode}", mode, 4 << 30)
    try:
        started = time.perf_counter()
        sent = post_all(collector.url + "/v1/traces", bodies, {"Content-Type": "application/x-protobuf"})
        landed_s = wait_landed(collector, traces, started, timeout_s)
        _, peak = collector.rss_mib()
        calls = collector.mlflow_calls()
    finally:
        collector.stop()
    busy_s = sum(total for _, total in calls.values())
    return {
        "phase": f"collector/{mode}",
        "spans": spans,
        "accepted_per_s": spans / sent.elapsed_s,
        "landed_per_s": spans / landed_s if landed_s else None,
        "landed_s": landed_s,
        "retries": sent.retries,
        "peak_rss_mib": peak,
        # Where the writer's time goes: MLflow calls per trace, their mean latency, and how busy
        # they kept the writer's workers (near 100%: landing is limited by MLflow, not the collector).
        "mlflow_calls_per_trace": sum(count for count, _ in calls.values()) / traces,
        "mlflow_mean_ms": {
            op: round(1000 * total / count, 1) for op, (count, total) in calls.items() if count
        },
        "writer_busy_in_mlflow": busy_s / (WRITER_WORKERS * landed_s) if landed_s else None,
    }


def direct_phase(stack: MlflowStack, requests_n: int) -> dict[str, object]:
    factory = RequestFactory(f"bench_direct_{uuid.uuid4().hex[:6]}")
    bodies = [factory.make() for _ in range(requests_n)]
    experiment_id = stack.client().create_experiment(f"bench_direct_{uuid.uuid4().hex[:8]}")
    headers = {"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id}
    sent = post_all(stack.tracking_uri + "/v1/traces", bodies, headers)
    spans = requests_n * factory.spans_per_request
    return {"phase": "mlflow-direct", "spans": spans, "landed_per_s": spans / sent.elapsed_s}


def outage_phase(
    stack: MlflowStack, tmp: Path, seconds: float, rate: float, spool_mib: int, memory_mib: int
) -> dict[str, object]:
    factory = RequestFactory(f"bench_outage_{uuid.uuid4().hex[:6]}")
    extra_env = {"GENAI_MLFLOW_COLLECTOR_MAX_MEMORY_BYTES": str(memory_mib << 20)} if memory_mib else None
    collector = start_collector(
        stack, tmp / f"collector-outage-{memory_mib}", "call", spool_mib << 20, extra_env
    )
    statuses: Counter[int] = Counter()
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    lock = threading.Lock()
    interval = SENDERS * factory.spans_per_request / rate  # per sender, between requests

    def sender() -> None:
        session = requests.Session()
        next_at = time.monotonic()
        while not stop.is_set():
            body = factory.make()
            try:
                status = session.post(
                    collector.url + "/v1/traces",
                    data=body,
                    headers={"Content-Type": "application/x-protobuf"},
                    timeout=30,
                ).status_code
            except requests.RequestException:
                status = -1
            with lock:
                statuses[status] += 1
            next_at += interval
            stop.wait(max(0.0, next_at - time.monotonic()))

    baseline, _ = collector.rss_mib()
    stack.stop_mlflow()
    try:
        threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while time.monotonic() - started < seconds:
            samples.append((time.monotonic() - started, collector.rss_mib()[0]))
            time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
        _, peak = collector.rss_mib()
        spool_bytes = collector.metric("genai_collector_spool_bytes")
    finally:
        collector.stop()
        stack.start_mlflow()
    by_window: dict[int, list[float]] = {}
    for at, rss in samples:
        by_window.setdefault(int(at // 10) * 10, []).append(rss)
    return {
        "phase": "outage",
        "seconds": seconds,
        "offered_spans_per_s": rate,
        "accepted_spans": statuses[200] * factory.spans_per_request,
        "statuses": dict(statuses),
        "rss_baseline_mib": baseline,
        "rss_peak_mib": peak,
        "rss_by_10s": {k: (min(v), statistics.median(v), max(v)) for k, v in sorted(by_window.items())},
        "spool_bytes_end": spool_bytes,
        "spool_bound_bytes": spool_mib << 20,
        "memory_limit_mib": memory_mib or None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer spans, a 20 s outage")
    parser.add_argument("--requests", type=int, help="requests of 500 spans per phase (default 40; quick 10)")
    parser.add_argument("--outage-s", type=float, help="seconds MLflow is down (default 60; quick 20)")
    parser.add_argument("--rate", type=float, default=GOAL_ACCEPTED, help="spans/s offered during the outage")
    parser.add_argument("--outage-spool-mib", type=int, default=64, help="the collector's spool bound then")
    parser.add_argument(
        "--outage-memory-mib",
        type=int,
        default=0,
        help="GENAI_MLFLOW_COLLECTOR_MAX_MEMORY_BYTES then, in MiB (default: none, as outside a container)",
    )
    parser.add_argument("--phases", default="direct,call,window,outage", help="which phases, comma-separated")
    args = parser.parse_args()
    requests_n = args.requests or (10 if args.quick else 40)
    outage_s = args.outage_s or (20.0 if args.quick else 60.0)

    phases = args.phases.split(",")
    results: list[dict[str, object]] = []
    outage: dict[str, object] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-collector-") as tmp_name:
        tmp = Path(tmp_name)
        with mlflow_stack(tmp / "stack") as stack:
            print(f"stack up: {stack.tracking_uri}", flush=True)
            for phase in [p for p in phases if p != "outage"]:
                if phase == "direct":
                    result = direct_phase(stack, requests_n)
                else:
                    result = collector_phase(stack, tmp, phase, requests_n, timeout_s=1800)
                results.append(result)
                print(result, flush=True)
            if "outage" in phases:
                outage = outage_phase(
                    stack, tmp, outage_s, args.rate, args.outage_spool_mib, args.outage_memory_mib
                )
                print(outage, flush=True)

    print()
    print(f"{'phase':<18} {'spans':>7} {'accepted/s':>11} {'landed/s':>9} {'peak RSS MiB':>13}")
    for r in results:
        accepted = r.get("accepted_per_s")
        landed = r.get("landed_per_s")
        peak = r.get("peak_rss_mib")
        print(
            f"{r['phase']:<18} {r['spans']:>7} "
            f"{(f'{accepted:,.0f}' if isinstance(accepted, float) else '-'):>11} "
            f"{(f'{landed:,.0f}' if isinstance(landed, float) else '-'):>9} "
            f"{(f'{peak:.0f}' if isinstance(peak, float) else '-'):>13}"
        )
    accepted_ok = all(
        isinstance(r.get("accepted_per_s"), float) and r["accepted_per_s"] >= GOAL_ACCEPTED  # type: ignore[operator]
        for r in results
        if str(r["phase"]).startswith("collector")
    )
    print(f"goal accepted >= {GOAL_ACCEPTED:,.0f} spans/s: {'met' if accepted_ok else 'NOT met'}")
    if outage is None:
        return 0 if accepted_ok else 1
    print(
        f"outage {outage['seconds']:.0f} s at {outage['offered_spans_per_s']:,.0f} spans/s offered: RSS "
        f"{outage['rss_baseline_mib']:.0f} MiB before, peak {outage['rss_peak_mib']:.0f} MiB; "
        f"answers {outage['statuses']}; "
        f"spool {outage['spool_bytes_end']:,.0f} of {outage['spool_bound_bytes']:,} bytes"
    )
    for window, (low, median, high) in outage["rss_by_10s"].items():  # type: ignore[attr-defined]
        print(
            f"  t={window:>3}-{window + 10:<3}s RSS min {low:.0f} / median {median:.0f} / max {high:.0f} MiB"
        )
    return 0 if accepted_ok else 1


if __name__ == "__main__":
    sys.exit(main())
