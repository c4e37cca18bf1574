"""From a request to a spool record (gate and ingest), metrics, settings and admission: no HTTP."""

from __future__ import annotations

import os

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags

from genai_mlflow.collector import otlp
from genai_mlflow.collector.config import CollectorConfig
from genai_mlflow.collector.gate import Entry, TraceGate
from genai_mlflow.collector.ingest import Ingestor
from genai_mlflow.collector.metering import CallCounter
from genai_mlflow.collector.metrics import MAX_SERIES, OTHER, CollectorMetrics, Registry
from genai_mlflow.collector.service import Guard
from genai_mlflow.config import ConfigError
from genai_mlflow.exporter import records
from genai_mlflow.exporter.pricing import PriceTable
from tests.collector.otlp_data import json_body, kv, llm_span, plain_span, request_of


class FakeSpool:
    def __init__(self, accept: bool = True) -> None:
        self.records: list[bytes] = []
        self.accept = accept

    def append(self, payload: bytes) -> bool:
        if self.accept:
            self.records.append(payload)
        return self.accept

    def spans(self) -> list:
        out: list = []
        for payload in self.records:
            request = ExportTraceServiceRequest.FromString(payload)
            out.extend(s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> CollectorMetrics:
    return CollectorMetrics.create()


def _ingestor(spool: FakeSpool, metrics: CollectorMetrics, gate: TraceGate | None = None) -> Ingestor:
    return Ingestor(spool.append, gate or TraceGate(), metrics)


def test_a_genai_request_is_spooled_as_it_came(metrics):
    spool = FakeSpool()
    body = request_of(llm_span(), llm_span()).SerializeToString()
    result = _ingestor(spool, metrics).ingest(body, otlp.PROTOBUF)
    assert (result.received, result.written, result.held, result.rejected.total) == (2, 2, 0, 0)
    assert spool.records == [body]  # nothing to change: the bytes themselves


def test_invalid_spans_are_left_out_and_the_rest_spooled(metrics):
    spool = FakeSpool()
    good = llm_span()
    bad = llm_span()
    bad.end_time_unix_nano = bad.start_time_unix_nano - 1
    nameless = llm_span()
    nameless.trace_id = b""
    result = _ingestor(spool, metrics).ingest(
        request_of(good, bad, nameless).SerializeToString(), otlp.PROTOBUF
    )
    assert result.rejected.counts == {"end_before_start": 1, "invalid_trace_id": 1}
    assert [s.span_id for s in spool.spans()] == [good.span_id]
    assert metrics.spans_rejected.value("end_before_start") == 1
    assert metrics.spans_received.value() == 3
    assert metrics.spans_accepted.value() == 1


def test_resource_and_scope_are_kept(metrics):
    spool = FakeSpool()
    request = request_of(llm_span(), resource={"gen_ai.agent.name": "from_resource"})
    request.resource_spans[0].scope_spans[0].scope.version = "1.2"
    bad = llm_span()
    bad.span_id = b""
    request.resource_spans[0].scope_spans[0].spans.append(bad)
    _ingestor(spool, metrics).ingest(json_body(request), otlp.JSON)
    (written,) = spool.records
    rs = ExportTraceServiceRequest.FromString(written).resource_spans[0]
    assert records.attributes(rs.resource.attributes)["gen_ai.agent.name"] == "from_resource"
    assert rs.scope_spans[0].scope.version == "1.2"
    assert len(rs.scope_spans[0].spans) == 1


def test_spans_of_traces_without_genai_wait_for_their_genai_span(metrics):
    spool = FakeSpool()
    ingestor = _ingestor(spool, metrics)
    trace_id = os.urandom(16)
    root = plain_span(trace_id)
    db_call = plain_span(trace_id, name="SELECT", parent=root.span_id)
    first = ingestor.ingest(request_of(db_call).SerializeToString(), otlp.PROTOBUF)
    assert (first.held, first.written) == (1, 0)
    assert spool.records == []
    llm = llm_span(trace_id, parent=root.span_id)
    second = ingestor.ingest(request_of(llm).SerializeToString(), otlp.PROTOBUF)
    assert second.written == 2  # the held database span, and the LLM span
    third = ingestor.ingest(request_of(root).SerializeToString(), otlp.PROTOBUF)  # known trace now
    assert third.written == 1
    spans = spool.spans()
    assert {s.span_id for s in spans} == {root.span_id, db_call.span_id, llm.span_id}
    parts = [t for p in spool.records for t in records.local_traces(ExportTraceServiceRequest.FromString(p))]
    (trace,) = records.merge(parts)
    assert records.is_complete(trace)


@pytest.mark.parametrize("remote_parent", [False, True], ids=["root", "remote-parent"])
def test_a_trace_is_forgotten_once_its_local_root_has_come(metrics, remote_parent):
    """The gate remembers the traces in flight, not every trace of the last hour: its memory stays
    flat under load. A local root with a remote parent leaves the trace known a while longer, for
    the callers' part of it (other services' spans, which end after it)."""
    clock = Clock()
    gate = TraceGate(passed_ttl_s=30, clock=clock)
    spool = FakeSpool()
    ingestor = _ingestor(spool, metrics, gate)
    trace_id = os.urandom(16)
    root = plain_span(trace_id, parent=os.urandom(8) if remote_parent else b"")
    spans = [llm_span(trace_id, parent=root.span_id), plain_span(trace_id, parent=root.span_id), root]
    for span in spans:  # as the Python SDK exports them
        span.flags = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | 0x01
    root.flags |= SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK if remote_parent else 0
    for span in spans:  # the LLM span makes the trace known; its siblings and root follow
        assert ingestor.ingest(request_of(span).SerializeToString(), otlp.PROTOBUF).written == 1
    if remote_parent:  # the caller's spans, within the while
        clock.now += 29
        caller = plain_span(trace_id, parent=os.urandom(8))
        assert ingestor.ingest(request_of(caller).SerializeToString(), otlp.PROTOBUF).written == 1
        clock.now += 2
    late = plain_span(trace_id, parent=root.span_id)
    assert ingestor.ingest(request_of(late).SerializeToString(), otlp.PROTOBUF).held == 1
    assert not gate._known and not gate._passed


def test_a_parent_without_flags_may_be_local_so_the_trace_stays_known(metrics):
    ingestor = _ingestor(FakeSpool(), metrics)
    trace_id = os.urandom(16)
    parent = os.urandom(8)
    ingestor.ingest(request_of(llm_span(trace_id, parent=parent)).SerializeToString(), otlp.PROTOBUF)
    ingestor.ingest(request_of(plain_span(trace_id, parent=parent)).SerializeToString(), otlp.PROTOBUF)
    later = plain_span(trace_id, parent=parent)
    assert ingestor.ingest(request_of(later).SerializeToString(), otlp.PROTOBUF).written == 1


def test_traces_without_genai_are_discarded_after_a_while():
    clock = Clock()
    metrics = CollectorMetrics.create()
    gate = TraceGate(held_ttl_s=60, clock=clock)
    spool = FakeSpool()
    ingestor = _ingestor(spool, metrics, gate)
    ingestor.ingest(
        request_of(plain_span(os.urandom(16)), plain_span(os.urandom(16))).SerializeToString(), otlp.PROTOBUF
    )
    assert gate.held_spans == 2
    clock.now += 61
    ingestor.ingest(request_of(llm_span()).SerializeToString(), otlp.PROTOBUF)
    assert gate.held_spans == 0 and gate.held_bytes == 0
    assert metrics.spans_discarded.value("no_genai") == 2
    assert len(spool.spans()) == 1


def test_held_spans_are_bounded_in_bytes(metrics):
    gate = TraceGate(held_max_bytes=5_000)
    ingestor = _ingestor(FakeSpool(), metrics, gate)
    for _ in range(100):
        ingestor.ingest(request_of(plain_span(os.urandom(16))).SerializeToString(), otlp.PROTOBUF)
    assert gate.held_bytes <= 5_000
    assert metrics.spans_discarded.value("held_overflow") == 100 - gate.held_spans


def test_a_spool_that_refuses_is_reported(metrics):
    spool = FakeSpool(accept=False)
    result = _ingestor(spool, metrics).ingest(request_of(llm_span()).SerializeToString(), otlp.PROTOBUF)
    assert not result.spooled
    assert metrics.spans_discarded.value("spool_full") == 1


def test_older_attribute_styles_are_translated_before_spooling(metrics):
    spool = FakeSpool()
    span = plain_span(os.urandom(16), name="openai.chat")
    span.attributes.extend(
        [kv("llm.request.type", "chat"), kv("gen_ai.system", "openai"), kv("gen_ai.usage.prompt_tokens", 3)]
    )
    result = _ingestor(spool, metrics).ingest(request_of(span).SerializeToString(), otlp.PROTOBUF)
    assert result.written == 1  # a GenAI span once translated
    attrs = records.span_attributes(spool.spans()[0])
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.usage.input_tokens"] == 3


def test_unreadable_requests_raise(metrics):
    with pytest.raises(otlp.RequestError):
        _ingestor(FakeSpool(), metrics).ingest(b"\xff\xff", otlp.PROTOBUF)


def test_gate_keeps_entries_of_known_traces_in_order():
    gate = TraceGate()
    trace_id = os.urandom(16)
    first = gate.admit({trace_id: [Entry(b"r", b"s", b"one")]}, set())
    assert first.held == 1
    second = gate.admit({trace_id: [Entry(b"r", b"s", b"two")]}, {trace_id})
    assert [e.span for e in second.write] == [b"one", b"two"]
    assert second.released == 1
    assert gate.discard_all() == 0


# --- metrics ------------------------------------------------------------------------------------


def test_prometheus_text_format():
    registry = Registry()
    counter = registry.counter("things_total", "Things.", ["kind"])
    counter.inc(2, 'a"b\\c\nd')
    histogram = registry.histogram("latency_seconds", "Latency.", ["op"], [0.1, 1.0])
    histogram.observe(0.05, "x")
    histogram.observe(0.5, "x")
    histogram.observe(5.0, "x")
    registry.observed("up", "Up.", lambda: [((), 1.0)])
    text = registry.render()
    assert "# TYPE things_total counter" in text
    assert 'things_total{kind="a\\"b\\\\c\\nd"} 2' in text
    assert 'latency_seconds_bucket{op="x",le="0.1"} 1' in text
    assert 'latency_seconds_bucket{op="x",le="1"} 2' in text
    assert 'latency_seconds_bucket{op="x",le="+Inf"} 3' in text
    assert 'latency_seconds_count{op="x"} 3' in text
    assert 'latency_seconds_sum{op="x"} 5.55' in text
    assert "\nup 1\n" in text
    assert text.endswith("\n")


def test_label_sets_are_bounded():
    counter = Registry().counter("c_total", "C.", ["persona"])
    for i in range(MAX_SERIES + 50):
        counter.inc(1, f"p{i}")
    assert counter.value(OTHER) == 50
    assert len(counter.lines()) == MAX_SERIES + 1


def test_call_counter_counts_each_trace_once():
    metrics = CollectorMetrics.create()
    calls = CallCounter(metrics, PriceTable.load())
    trace_id = os.urandom(16)
    request = request_of(
        llm_span(trace_id, persona="counted", input_tokens=1000, output_tokens=10, duration_ns=2 * 10**9)
    )
    calls.observe(request)
    calls.observe(request)  # a retried post
    assert metrics.tokens.value("counted", "gpt-4o-mini", "input") == 1000
    assert metrics.tokens.value("counted", "gpt-4o-mini", "output") == 10
    assert metrics.cost.value("counted", "gpt-4o-mini") == pytest.approx(1000 * 0.15e-6 + 10 * 0.6e-6)
    assert metrics.call_duration.count("counted", "gpt-4o-mini") == 1


# --- settings and admission ---------------------------------------------------------------------


def test_collector_config_from_arguments_then_environment():
    env = {"GENAI_MLFLOW_COLLECTOR_TOKEN": "s3cret", "GENAI_MLFLOW_COLLECTOR_MAX_BODY_BYTES": "1024"}
    config = CollectorConfig.resolve(env, port=9999, max_body_bytes=None, token=None)
    assert (config.port, config.token, config.max_body_bytes) == (9999, "s3cret", 1024)
    assert CollectorConfig.resolve({}, token="arg").token == "arg"
    assert CollectorConfig.resolve({}).port == 4318


@pytest.mark.parametrize(
    ("env", "arguments"),
    [
        ({"GENAI_MLFLOW_COLLECTOR_PORT": "http"}, {}),
        ({}, {"max_body_bytes": 0}),
        ({}, {"spool_high_water": 1.5}),
        ({}, {"no_such_option": 1}),
    ],
)
def test_bad_collector_settings_are_config_errors(env, arguments):
    with pytest.raises(ConfigError):
        CollectorConfig.resolve(env, **arguments)


def test_guard_limits_concurrency_and_rate():
    clock = Clock()
    guard = Guard(max_inflight=2, max_rps=0, clock=clock)
    assert guard.enter() is None and guard.enter() is None
    assert guard.enter() == "inflight"
    guard.leave()
    assert guard.enter() is None
    rated = Guard(max_inflight=100, max_rps=2, clock=clock)
    assert rated.enter() is None and rated.enter() is None
    assert rated.enter() == "rate"
    clock.now += 0.5
    assert rated.enter() is None
