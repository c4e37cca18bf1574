"""The writer against a fake MLflow: when traces are dispatched, what a wake costs, what mode
``window`` logs when its batches land at once, how much it reads ahead, and what flush() and the
logs say when MLflow refuses."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags

from genai_mlflow import semconv as sc
from genai_mlflow.exporter import records, writer
from genai_mlflow.exporter.gateway import GatewayError
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.spool import Record, RecordId, Spool
from genai_mlflow.exporter.writer import Writer
from genai_mlflow.throttle import Throttle

PRICES = PriceTable.load()
PERSONA = "support_bot"
WAIT_S = 20.0


# ---------------------------------------------------------------------------------------------
# Spans, a clock and a fake MLflow


def call_payload(*, end_ns: int, latency_ms: int = 300, complete: bool = True) -> bytes:
    """One spooled record: a standalone LLM call, or (``complete=False``) a call whose local parent
    has not arrived, so the trace waits for its root."""
    span = Span(
        trace_id=os.urandom(16),
        span_id=os.urandom(8),
        name="chat gpt-4o-mini",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=end_ns - latency_ms * 1_000_000,
        end_time_unix_nano=end_ns,
    )
    if not complete:
        span.parent_span_id = os.urandom(8)
        span.flags = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK  # the parent is local
    attrs: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_PROVIDER_NAME: "openai",
        sc.GEN_AI_REQUEST_MODEL: "gpt-4o-mini",
        sc.GEN_AI_USAGE_INPUT_TOKENS: 12,
        sc.GEN_AI_USAGE_OUTPUT_TOKENS: 3,
        sc.GEN_AI_AGENT_NAME: PERSONA,
    }
    for key, value in attrs.items():
        any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
        span.attributes.append(KeyValue(key=key, value=any_value))
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value="ask-api"))
    )
    resource_spans.scope_spans.add().spans.append(span)
    payload: bytes = request.SerializeToString()
    return payload


def span_trace_id(payload: bytes) -> str:
    """The trace id (hex) of a record made by ``call_payload``."""
    request = ExportTraceServiceRequest.FromString(payload)
    trace_id: bytes = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    return trace_id.hex()


def this_hour_ns(second: int) -> int:
    """A time in the current UTC hour, so that no window of a test is ended as past."""
    now = time.time()
    return int((now - now % 3600 + second) * 1e9)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeGateway:
    """Records every call; ``post_traces`` can fail, and can take a while."""

    tracking_uri = "http://mlflow.invalid"

    def __init__(self, *, post_s: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.post_s = post_s
        self.fail_posts = 0  # fail this many post_traces calls, then succeed
        self.refuse: GatewayError | None = None  # raised by every post_traces call
        self.calls: list[str] = []
        self.posted: dict[str, list[str]] = {}  # run id -> trace ids (hex), as posted
        self.metrics: dict[str, list[tuple[str, float, int, int]]] = {}  # run id -> rows
        self.posts_in_flight = 0
        self.most_posts_in_flight = 0
        self._runs = 0

    def _record(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)

    def count(self, name: str) -> int:
        with self.lock:
            return self.calls.count(name)

    def experiment_id(self, name: str, tags: dict[str, str]) -> str:
        self._record("experiment_id")
        return "1"

    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict[str, str]) -> str:
        self._record("create_run")
        with self.lock:
            self._runs += 1
            return f"run-{self._runs}"

    def log_batch(
        self,
        run_id: str,
        params: dict[str, str],
        metrics: Any,
        tags: dict[str, str],
    ) -> None:
        self._record("log_batch")
        with self.lock:
            self.metrics.setdefault(run_id, []).extend(metrics)

    def end_run(self, run_id: str, status: str, end_ms: int) -> None:
        self._record("end_run")

    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None:
        self._record("find_run")
        return None

    def post_traces(self, experiment_id: str, run_id: str | None, request: ExportTraceServiceRequest) -> None:
        self._record("post_traces")
        if self.refuse is not None:
            raise self.refuse
        with self.lock:
            self.posts_in_flight += 1
            self.most_posts_in_flight = max(self.most_posts_in_flight, self.posts_in_flight)
            fail = self.fail_posts > 0
            self.fail_posts -= fail
        try:
            time.sleep(self.post_s)
            if fail:
                raise GatewayError("POST /v1/traces answered 503: try again")
            trace_ids = [rs.scope_spans[0].spans[0].trace_id.hex() for rs in request.resource_spans]
            with self.lock:
                self.posted.setdefault(run_id or "", []).extend(trace_ids)
        finally:
            with self.lock:
                self.posts_in_flight -= 1

    def upload(self, run_id: str, offloads: Any) -> None:
        self._record("upload")

    def artifact_uri(self, run_id: str, path: str) -> str:
        return f"runs:/{run_id}/{path}"


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    with Spool(str(tmp_path / "spool")) as spool:
        yield spool


@pytest.fixture
def make_writer(spool: Spool) -> Iterator[Callable[..., Writer]]:
    """A writer that is not started: a test drives its drain cycles itself (it holds the drain lock)."""
    made: list[Writer] = []

    def make(gateway: FakeGateway, **options: Any) -> Writer:
        assert spool.acquire_drain_lock()
        made.append(Writer(spool, gateway, PRICES, **options))
        return made[-1]

    yield make
    for w in made:
        w.shutdown(0.1)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def settled(w: Writer) -> bool:
    """Nothing of the writer's is in flight (each landing has been accounted for)."""
    with w._lock:
        return not any(p.in_flight for p in w._pending.values())


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_a_trace_in_backoff_is_not_retried_before_its_backoff_ends(
    spool: Spool, make_writer: Callable[..., Writer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "backoff", lambda attempt: 30.0)
    gateway = FakeGateway()
    gateway.fail_posts = 1
    clock = Clock()
    w = make_writer(gateway, clock=clock)
    spool.append(call_payload(end_ns=this_hour_ns(1)))

    w._drain_once()
    wait_until(lambda: gateway.count("post_traces") == 1 and settled(w), "the first attempt")
    clock.now += 29.0
    for _ in range(20):
        w._drain_once()
    wait_until(lambda: settled(w), "anything dispatched to settle")
    assert gateway.count("post_traces") == 1
    assert w.landed == 0

    clock.now += 2.0
    w._drain_once()
    wait_until(lambda: w.landed == 1, "the retry")
    assert gateway.count("post_traces") == 2
    assert gateway.count("create_run") == 1  # the retry finishes the run the first attempt made


def test_a_large_backlog_is_dispatched_without_rescanning_what_waits(
    spool: Spool, make_writer: Callable[..., Writer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wake costs what is due: traces waiting for their local root are looked at when they
    arrive and when they turn orphan, not on every wake (which was quadratic in the backlog)."""
    looked_at = [0]
    is_complete = records.is_complete

    def counting(trace: records.LocalTrace) -> bool:
        looked_at[0] += 1
        return is_complete(trace)

    monkeypatch.setattr(records, "is_complete", counting)
    gateway = FakeGateway()
    clock = Clock()
    w = make_writer(gateway, clock=clock)
    waiting, ready = 3000, 500
    for i in range(waiting):
        spool.append(call_payload(end_ns=this_hour_ns(i), complete=False))
    for i in range(ready):
        spool.append(call_payload(end_ns=this_hour_ns(i)))
    w._drain_once()
    wait_until(lambda: w.landed == ready, "the complete traces")

    looked_at[0] = 0
    for _ in range(50):
        w._drain_once()
        clock.now += 1.0
    assert looked_at[0] == 0  # the rescan looked at all 3,000 waiting traces on each of the 50 wakes
    assert settled(w)
    assert gateway.count("post_traces") == ready  # each dispatched once

    clock.now += writer.ORPHAN_AFTER_S
    w._drain_once()
    wait_until(lambda: w.landed == ready + waiting, "the orphans")
    assert gateway.count("post_traces") == ready + waiting


def test_an_incomplete_trace_waits_for_its_root_until_it_counts_as_an_orphan(
    spool: Spool, make_writer: Callable[..., Writer]
) -> None:
    gateway = FakeGateway()
    clock = Clock()
    w = make_writer(gateway, clock=clock)
    spool.append(call_payload(end_ns=this_hour_ns(1), complete=False))
    w._drain_once()
    clock.now += writer.ORPHAN_AFTER_S - 1.0
    w._drain_once()
    assert settled(w)
    assert gateway.count("post_traces") == 0

    clock.now += 1.0
    w._drain_once()
    wait_until(lambda: w.landed == 1, "the orphan")


def _part(service: str, trace_id: bytes, spans: list[Span]) -> bytes:
    """One service's part of a trace, as its exporter sends it."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value=service))
    )
    for span in spans:
        span.trace_id = trace_id
    resource_spans.scope_spans.add().spans.extend(spans)
    payload: bytes = request.SerializeToString()
    return payload


class KeepingGateway(FakeGateway):
    def __init__(self) -> None:
        super().__init__()
        self.span_names: list[list[str]] = []  # per post

    def post_traces(self, experiment_id: str, run_id: str | None, request: ExportTraceServiceRequest) -> None:
        super().post_traces(experiment_id, run_id, request)
        with self.lock:
            self.span_names.append(
                sorted(s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
            )


def test_parts_of_a_trace_from_two_services_land_together_within_the_settle_time(
    spool: Spool, make_writer: Callable[..., Writer]
) -> None:
    """A collector gets a trace in parts: the called service's part (whole on its own, its root's
    parent being remote) may come before the caller's. Both land as one trace."""
    gateway = KeepingGateway()
    clock = Clock()
    w = make_writer(gateway, clock=clock, settle_s=10.0)
    trace_id, ids = os.urandom(16), [os.urandom(8) for _ in range(4)]
    start = this_hour_ns(1)
    remote = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
    llm = Span(span_id=ids[3], parent_span_id=ids[2], name="chat gpt-4o-mini", kind=Span.SPAN_KIND_CLIENT)
    llm.attributes.append(KeyValue(key=sc.GEN_AI_OPERATION_NAME, value=AnyValue(string_value="chat")))
    called = [
        Span(
            span_id=ids[2],
            parent_span_id=ids[1],
            flags=remote,
            name="POST /answer",
            kind=Span.SPAN_KIND_SERVER,
        ),
        llm,
    ]
    caller = [
        Span(span_id=ids[0], name="GET /ask", kind=Span.SPAN_KIND_SERVER),
        Span(span_id=ids[1], parent_span_id=ids[0], name="POST", kind=Span.SPAN_KIND_CLIENT),
    ]
    for span in called + caller:
        span.start_time_unix_nano, span.end_time_unix_nano = start, start + 10**8

    spool.append(_part("answerer", trace_id, called))
    w._drain_once()
    clock.now += 3.0
    spool.append(_part("front", trace_id, caller))
    w._drain_once()
    clock.now += 9.9  # 9.9 s after the last part
    w._drain_once()
    assert settled(w)
    assert gateway.count("post_traces") == 0

    clock.now += 0.1
    w._drain_once()
    wait_until(lambda: w.landed == 1, "the whole trace")
    assert gateway.span_names == [["GET /ask", "POST", "POST /answer", "chat gpt-4o-mini"]]
    assert gateway.count("create_run") == 1
    assert w.late_spans == 0


# ---------------------------------------------------------------------------------------------
# Mode window


def test_window_batches_land_at_once_with_exact_steps_and_sums(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches overlap (one even fails and is retried meanwhile); each call is still one step, every
    step from 0 is there once, and the run's ``*_sum`` metrics (the value at the highest step) are
    the totals."""
    monkeypatch.setattr(writer, "backoff", lambda attempt: 0.0)
    gateway = FakeGateway(post_s=0.3)
    gateway.fail_posts = 1
    calls = 450
    latencies = [100 + i for i in range(calls)]
    for i, latency in enumerate(latencies):
        spool.append(call_payload(end_ns=this_hour_ns(i), latency_ms=latency))
    w = Writer(spool, gateway, PRICES, mode="window", workers=8)
    w.start()
    try:
        assert w.flush(WAIT_S)
    finally:
        w.shutdown(1.0)

    assert 2 <= gateway.most_posts_in_flight <= writer.WINDOW_BATCHES_IN_FLIGHT
    assert gateway.count("create_run") == 1
    [(run_id, rows)] = gateway.metrics.items()
    assert len(set(gateway.posted[run_id])) == calls
    unique = set(rows)  # MLflow keeps one of identical rows, as a retry may log them again
    steps = sorted(step for name, _, _, step in unique if name == sc.METRIC_LATENCY_MS)
    assert steps == list(range(calls))
    assert sorted(value for name, value, _, _ in unique if name == sc.METRIC_LATENCY_MS) == pytest.approx(
        latencies
    )

    def latest(name: str) -> float:
        return max((step, value) for key, value, _, step in unique if key == name)[1]

    assert latest("llm_calls_sum") == calls
    assert latest(f"{sc.METRIC_LATENCY_MS}_sum") == pytest.approx(sum(latencies))
    assert latest(f"{sc.METRIC_PROMPT_TOKENS}_sum") == 12 * calls
    assert latest(f"{sc.METRIC_TOTAL_TOKENS}_sum") == 15 * calls


def test_a_window_batch_short_of_a_full_request_waits_a_little_for_more(
    spool: Spool, make_writer: Callable[..., Writer]
) -> None:
    gateway = FakeGateway()
    clock = Clock()
    w = make_writer(gateway, mode="window", clock=clock)
    for i in range(10):
        spool.append(call_payload(end_ns=this_hour_ns(i)))
    w._drain_once()
    clock.now += writer.WINDOW_LINGER_S - 0.1
    w._drain_once()
    assert settled(w)
    assert gateway.count("post_traces") == 0

    for i in range(writer.MAX_TRACES_PER_REQUEST):  # a full request goes at once
        spool.append(call_payload(end_ns=this_hour_ns(i)))
    w._drain_once()
    wait_until(lambda: w.landed == writer.MAX_TRACES_PER_REQUEST, "a full batch")
    clock.now += writer.WINDOW_LINGER_S  # the rest has now waited long enough
    w._drain_once()
    wait_until(lambda: w.landed == writer.MAX_TRACES_PER_REQUEST + 10, "the rest")
    assert gateway.count("post_traces") == 2


# ---------------------------------------------------------------------------------------------
# Read-ahead and the circuit breaker


class HeldBytes:
    """The spool payload a writer holds: what it read and has not committed, at most ever, and
    how many records it read."""

    def __init__(self, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held: dict[RecordId, int] = {}
        self.peak = 0
        self.records_read = 0
        read, commit = spool.read, spool.commit

        def reading(max_records: int = 1000) -> list[Record]:
            batch = read(max_records)
            self.records_read += len(batch)
            self.held.update((record.id, len(record.payload)) for record in batch)
            self.peak = max(self.peak, sum(self.held.values()))
            return batch

        def committing(ids: Any) -> None:
            ids = list(ids)
            for record_id in ids:
                self.held.pop(record_id, None)
            commit(ids)

        monkeypatch.setattr(spool, "read", reading)
        monkeypatch.setattr(spool, "commit", committing)


def test_the_read_ahead_holds_no_more_than_its_bound_in_bytes_and_all_lands_once_after_an_outage(
    spool: Spool, make_writer: Callable[..., Writer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "backoff", lambda attempt: 1.0)
    payloads = [call_payload(end_ns=this_hour_ns(i)) for i in range(100)]
    record = max(len(p) for p in payloads)
    bound = 10 * record + record // 2
    for payload in payloads:
        spool.append(payload)
    held = HeldBytes(spool, monkeypatch)
    gateway = FakeGateway()
    gateway.fail_posts = 1_000_000
    clock = Clock()
    w = make_writer(gateway, clock=clock, max_pending_bytes=bound)

    for _ in range(10):  # MLflow fails: the breaker opens, half-opens, a probe fails, and again
        w._drain_once()
        wait_until(lambda: settled(w), "the attempts to settle")
        clock.now += 1.5
    assert w.landed == 0
    assert bound - record < held.peak <= bound + record  # a read of 1000 records held all 100

    with gateway.lock:
        gateway.fail_posts = 0
    for _ in range(200):
        if w.landed == len(payloads):
            break
        w._drain_once()
        wait_until(lambda: settled(w), "the landings to settle")
        clock.now += 1.5
    assert w.landed == len(payloads)
    assert held.peak <= bound + record
    landed = [trace_id for trace_ids in gateway.posted.values() for trace_id in trace_ids]
    assert sorted(landed) == sorted({span_trace_id(p) for p in payloads})  # each once
    assert not held.held
    assert spool.status().pending_records == 0


@pytest.mark.parametrize(("mode", "probe"), [("call", 1), ("window", writer.MAX_TRACES_PER_REQUEST)])
def test_nothing_is_read_while_the_breaker_is_open_and_one_probe_goes_when_it_half_opens(
    spool: Spool,
    make_writer: Callable[..., Writer],
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    probe: int,
) -> None:
    monkeypatch.setattr(writer, "backoff", lambda attempt: 10.0)
    calls = 250  # mode window: more than one full batch is ready when the breaker half-opens
    for i in range(calls):
        spool.append(call_payload(end_ns=this_hour_ns(i)))
    held = HeldBytes(spool, monkeypatch)
    gateway = FakeGateway()
    clock = Clock()
    w = make_writer(gateway, mode=mode, clock=clock)
    for _ in range(3):  # MLflow failed 3 times in a row
        w._breaker.failure(GatewayError("POST /v1/traces answered 503"))

    for _ in range(5):
        w._drain_once()
        clock.now += 1.0
    assert held.records_read == 0  # MLflow is down: the backlog stays on disk
    assert gateway.calls == []

    clock.now += 10.0  # the cooldown is over: the breaker half-opens
    w._drain_once()
    wait_until(lambda: settled(w), "the probe to land")
    assert gateway.count("post_traces") == 1
    assert w.landed == probe

    clock.now += writer.WINDOW_LINGER_S  # MLflow is back: the rest goes
    w._drain_once()
    wait_until(lambda: w.landed == calls, "the rest")
    landed = [trace_id for trace_ids in gateway.posted.values() for trace_id in trace_ids]
    assert len(landed) == len(set(landed)) == calls


# ---------------------------------------------------------------------------------------------
# When MLflow refuses


@pytest.mark.parametrize("standby_s", [0.0, 0.3])
def test_flush_just_after_start_says_at_once_that_a_trace_was_given_up(
    spool: Spool, standby_s: float
) -> None:
    """flush() before the drain thread has taken the drain lock waited for the spool to empty,
    which a trace given up on (kept in the spool) never lets happen: False, but at the timeout."""
    gateway = FakeGateway()
    gateway.refuse = GatewayError("POST /v1/traces answered 403: PERMISSION_DENIED", retryable=False)
    spool.append(call_payload(end_ns=this_hour_ns(1)))
    w = Writer(spool, gateway, PRICES)
    w.start(standby_s=standby_s)
    try:
        started = time.monotonic()
        assert w.flush(10) is False
        elapsed = time.monotonic() - started
    finally:
        w.shutdown(0.1)
    assert elapsed < 5, f"flush() waited {elapsed:.1f}s for a trace the writer had given up on"
    assert gateway.count("post_traces") == 1


@pytest.mark.parametrize(
    ("status", "hint"),
    [(401, "Check MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"), (403, "grant it permission")],
)
def test_traces_given_up_are_logged_once_in_a_while_with_the_server_and_a_fix(
    spool: Spool,
    make_writer: Callable[..., Writer],
    caplog: pytest.LogCaptureFixture,
    status: int,
    hint: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="genai_mlflow")
    gateway = FakeGateway()
    gateway.tracking_uri = "https://admin:s3cret@mlflow.example:5000"
    gateway.refuse = GatewayError(f"POST /api/2.0/mlflow/runs/create answered {status}: no", retryable=False)
    w = make_writer(gateway)
    for i in range(5):
        spool.append(call_payload(end_ns=this_hour_ns(i)))
    w._drain_once()
    wait_until(lambda: w.failed == 5 and settled(w), "the traces to be given up")

    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"answered {status}" in line
    assert "will not retry" in line
    assert "https://mlflow.example:5000" in line
    assert hint in line
    assert "MLFLOW_TRACKING_TOKEN" in line
    assert "`genai-mlflow doctor`" in line
    assert "s3cret" not in caplog.text

    w._given_up_log = Throttle(0.0)  # the interval is over
    spool.append(call_payload(end_ns=this_hour_ns(9)))
    w._drain_once()
    wait_until(lambda: w.failed == 6 and settled(w), "one more trace to be given up")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 2
    assert "4 more trace(s) given up since the last such message" in lines[1]


def test_shutdown_just_after_start_lands_what_is_spooled(spool: Spool) -> None:
    """shutdown() before the drain thread had taken the drain lock said True and landed nothing."""
    gateway = FakeGateway()
    for second in range(3):
        spool.append(call_payload(end_ns=this_hour_ns(second)))
    w = Writer(spool, gateway, PRICES)
    w.start()
    assert w.shutdown(10) is True
    assert gateway.count("post_traces") == 3
