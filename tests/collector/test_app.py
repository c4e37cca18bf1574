"""The collector over HTTP, writing to a real MLflow: answers, bad input, auth, load shedding,
health, metrics and graceful shutdown."""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags

from genai_mlflow.collector import CollectorConfig, CollectorServer
from genai_mlflow.config import Settings
from genai_mlflow.stack import free_port
from tests.collector.conftest import (
    MAX_BODY_BYTES,
    CollectorProcess,
    start_collector,
    stop_collector,
    today,
    wait_for_traces,
)
from tests.collector.otlp_data import (
    llm_span,
    nested_any_value_bytes,
    plain_span,
    request_of,
    request_with_raw_value,
    to_otlp_json,
)
from tests.mlflow_stack import MlflowStack


@pytest.fixture
def persona() -> str:
    return f"collector_{uuid.uuid4().hex[:8]}"


def _rpc_status_message(body: bytes) -> str:
    """The message of a protobuf google.rpc.Status (field 2), decoded by hand."""
    assert body[0] == 0x08  # code
    pos = 2
    assert body[pos] == 0x12
    length, pos = body[pos + 1], pos + 2
    return body[pos : pos + length].decode()


# --- accepted requests ----------------------------------------------------------------------------


def test_protobuf_export_lands_in_the_persona_experiment(collector: CollectorProcess, mlflow_server, persona):
    spans = [llm_span(persona=persona, input_tokens=100, output_tokens=20) for _ in range(3)]
    response = collector.post(request_of(*spans).SerializeToString())
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/x-protobuf"
    assert not ExportTraceServiceResponse.FromString(response.content).HasField("partial_success")
    traces = wait_for_traces(mlflow_server, f"{persona}_{today()}", 3)
    assert {t.info.trace_id for t in traces} == {"tr-" + s.trace_id.hex() for s in spans}
    experiment = mlflow_server.client().get_experiment_by_name(f"{persona}_{today()}")
    assert len(mlflow_server.client().search_runs([experiment.experiment_id])) == 3
    assert collector.metric("genai_tokens_total", persona=persona, model="gpt-4o-mini", type="input") == 300
    assert collector.metric("genai_tokens_total", persona=persona, model="gpt-4o-mini", type="output") == 60
    assert collector.metric("genai_cost_usd_total", persona=persona, model="gpt-4o-mini") > 0
    assert collector.metric("genai_call_duration_seconds_count", persona=persona, model="gpt-4o-mini") == 3
    assert (
        collector.metric("genai_collector_mlflow_request_duration_seconds_count", operation="post_traces")
        >= 3
    )


def test_protobuf_partial_success_counts_invalid_spans_and_lands_the_rest(
    collector: CollectorProcess, mlflow_server, persona
):
    good = [llm_span(persona=persona), llm_span(persona=persona)]
    no_trace_id = llm_span(persona=persona)
    no_trace_id.trace_id = b""
    backwards = llm_span(persona=persona)
    backwards.end_time_unix_nano = backwards.start_time_unix_nano - 1_000
    too_deep = llm_span(persona=persona, extra={"deep": [[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]})
    response = collector.post(
        request_of(good[0], no_trace_id, backwards, too_deep, good[1]).SerializeToString()
    )
    assert response.status_code == 200
    partial = ExportTraceServiceResponse.FromString(response.content).partial_success
    assert partial.rejected_spans == 3
    for reason in ("invalid_trace_id", "end_before_start", "too_deep"):
        assert reason in partial.error_message
    traces = wait_for_traces(mlflow_server, f"{persona}_{today()}", 2)
    assert {t.info.trace_id for t in traces} == {"tr-" + s.trace_id.hex() for s in good}
    assert collector.metric("genai_collector_spans_rejected_total", reason="end_before_start") >= 1
    assert collector.alive


def test_json_partial_success_with_invalid_utf8_and_missing_ids(
    collector: CollectorProcess, mlflow_server, persona
):
    good = [llm_span(), llm_span()]
    document = to_otlp_json(request_of(*good, resource={"gen_ai.agent.name": persona}))
    spans = document["resourceSpans"][0]["scopeSpans"][0]["spans"]
    template = spans[0]
    spans.append({**template, "spanId": os.urandom(8).hex(), "name": "XBADUTF8X"})
    spans.append({**template, "spanId": os.urandom(8).hex(), "traceId": ""})
    spans.append({**template, "spanId": "", "traceId": os.urandom(16).hex()})
    body = json.dumps(document).encode().replace(b"XBADUTF8X", b"bad \xff\xfe utf-8")
    response = collector.post(gzip.compress(body), "application/json", **{"Content-Encoding": "gzip"})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    partial = response.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "3"
    for reason in ("invalid_utf8", "invalid_trace_id", "invalid_span_id"):
        assert reason in partial["errorMessage"]
    traces = wait_for_traces(mlflow_server, f"{persona}_{today()}", 2)  # persona from the resource
    assert {t.info.trace_id for t in traces} == {"tr-" + s.trace_id.hex() for s in good}


def test_context_spans_sent_before_and_after_the_llm_span_land_with_it(
    collector: CollectorProcess, mlflow_server, persona
):
    trace_id = os.urandom(16)
    start = time.time_ns()
    root = plain_span(trace_id, name="POST /chat", start_ns=start)
    lookup = plain_span(trace_id, name="SELECT user", parent=root.span_id, start_ns=start + 1000)
    call = llm_span(trace_id, persona=persona, parent=root.span_id, start_ns=start + 2000)
    unrelated = plain_span(os.urandom(16), name="GET /health")
    for span in (root, lookup, call):  # as the Python SDK exports them: parent local, not remote
        span.flags = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | 0x01
    for spans in ((lookup, unrelated), (call,), (root,)):  # the order an app's batches come in
        assert collector.post(request_of(*spans).SerializeToString()).status_code == 200
    (trace,) = wait_for_traces(mlflow_server, f"{persona}_{today()}", 1)
    landed = mlflow_server.client().get_trace(trace.info.trace_id)
    assert sorted(s.name for s in landed.data.spans) == ["POST /chat", "SELECT user", "chat gpt-4o-mini"]
    assert collector.metric("genai_collector_held_spans") >= 1  # the unrelated trace's span waits


# --- unreadable requests --------------------------------------------------------------------------

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


def _bad_requests() -> list:
    valid = request_of(llm_span()).SerializeToString()
    marked = request_of(llm_span(extra={"m": "XMARKERX"})).SerializeToString()
    return [
        pytest.param(valid[:-9], PROTOBUF, {}, 400, "unreadable protobuf", id="truncated-protobuf"),
        pytest.param(bytes(range(256)) * 16, PROTOBUF, {}, 400, "unreadable protobuf", id="garbage-protobuf"),
        pytest.param(b'{"resourceSpans": [{"scopeSpans": ', JSON, {}, 400, "invalid JSON", id="invalid-json"),
        pytest.param(valid, "text/plain", {}, 415, "unsupported content type", id="wrong-content-type"),
        pytest.param(
            valid, PROTOBUF, {"Content-Encoding": "br"}, 415, "content encoding", id="unknown-encoding"
        ),
        pytest.param(b"\x00" * (2 * MAX_BODY_BYTES), PROTOBUF, {}, 413, "over the limit", id="huge-body"),
        pytest.param(
            gzip.compress(bytes(64 * MAX_BODY_BYTES)),
            PROTOBUF,
            {"Content-Encoding": "gzip"},
            413,
            "decompressed",
            id="gzip-bomb",
        ),
        pytest.param(
            b"not gzip", PROTOBUF, {"Content-Encoding": "gzip"}, 400, "not valid gzip", id="bad-gzip"
        ),
        pytest.param(
            b'{"resourceSpans": [' + b"[" * 50_000 + b"]" * 50_000 + b"]}",
            JSON,
            {},
            400,
            "nested too deeply",
            id="deep-json",
        ),
        pytest.param(
            request_with_raw_value(nested_any_value_bytes(150)),
            PROTOBUF,
            {},
            400,
            "Depth",
            id="deep-protobuf",
        ),
        pytest.param(
            marked.replace(b"XMARKERX", b"\xff\xfeMARKER"), PROTOBUF, {}, 400, "UTF-8", id="bad-utf8-protobuf"
        ),
    ]


@pytest.mark.parametrize(("body", "content_type", "headers", "status", "reason"), _bad_requests())
def test_unreadable_requests_get_a_4xx_with_a_reason(
    collector: CollectorProcess, body, content_type, headers, status, reason
):
    response = collector.post(body, content_type, **headers)
    assert response.status_code == status, response.content[:300]
    if response.headers["Content-Type"] == PROTOBUF:
        message = _rpc_status_message(response.content)
    elif response.headers["Content-Type"] == JSON:
        message = response.json()["message"]
    else:
        message = response.text
    assert reason in message
    assert collector.alive
    # and the next request on a fresh connection is served as usual
    assert collector.post(request_of(llm_span()).SerializeToString()).status_code == 200


def test_refused_requests_are_counted_and_the_collector_stays_up(collector: CollectorProcess):
    before = collector.metric("genai_collector_requests_total", code="400")
    for _ in range(20):
        assert collector.post(b"\xff" * 2048).status_code == 400
    assert collector.post(b"\x00" * (MAX_BODY_BYTES + 1)).status_code == 413
    assert collector.alive
    assert collector.metric("genai_collector_requests_total", code="400") == before + 20
    assert collector.metric("genai_collector_requests_total", code="413") >= 1


# --- auth, routes, health -------------------------------------------------------------------------


def test_a_bearer_token_is_required(collector: CollectorProcess):
    body = request_of(llm_span()).SerializeToString()
    url = collector.url + "/v1/traces"
    missing = requests.post(url, data=body, headers={"Content-Type": PROTOBUF}, timeout=10)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = requests.post(
        url, data=body, headers={"Content-Type": PROTOBUF, "Authorization": "Bearer nope"}, timeout=10
    )
    assert wrong.status_code == 401
    assert "bearer token" in _rpc_status_message(wrong.content)


def test_routes_health_and_readiness(collector: CollectorProcess):
    assert collector.get("/healthz").text == "ok\n"
    ready = collector.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "stopping": False,
        "spool_writable": True,
        "spool_has_room": True,
        "mlflow_reachable": True,
    }
    assert collector.get("/nope").status_code == 404
    assert collector.get("/v1/traces").status_code == 405
    assert collector.post(b"", PROTOBUF).status_code == 200  # an empty export is fine
    metrics = collector.get("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for name in (
        "genai_collector_spans_received_total",
        "genai_collector_spool_records",
        "genai_collector_spool_bytes",
        "genai_collector_spool_dropped_records_total",
        "genai_collector_traces_landed_total",
        "genai_collector_mlflow_up",
    ):
        assert f"# TYPE {name} " in metrics.text


# --- load shedding, in-process collectors whose MLflow is down ------------------------------------


@pytest.fixture
def offline_settings(tmp_path: Path) -> Settings:
    """MLflow on a port where nothing listens: everything stays in a 1 MiB spool."""
    return Settings.resolve(
        f"http://127.0.0.1:{free_port()}", spool_dir=str(tmp_path / "spool"), spool_max_bytes=1 << 20
    )


@pytest.fixture
def in_process(offline_settings: Settings) -> Iterator:
    servers: list[CollectorServer] = []

    def start(**options) -> CollectorServer:
        server = CollectorServer(offline_settings, CollectorConfig(host="127.0.0.1", port=0, **options))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=0.5)


def _post(server: CollectorServer, body: bytes) -> requests.Response:
    return requests.post(server.url + "/v1/traces", data=body, headers={"Content-Type": PROTOBUF}, timeout=10)


def test_request_rate_over_the_limit_is_429_with_retry_after(in_process):
    server = in_process(max_rps=0.2)  # a burst of one, then one every 5 s
    body = request_of(llm_span()).SerializeToString()
    assert _post(server, body).status_code == 200
    shed = _post(server, body)
    assert shed.status_code == 429
    assert shed.headers["Retry-After"] == "1"
    assert server.service.metrics.shed.value("rate") == 1


def test_a_full_spool_is_503_with_retry_after_and_not_ready(in_process):
    server = in_process()
    filler = request_of(*(llm_span(extra={"pad": "x" * 2000}) for _ in range(40))).SerializeToString()
    statuses = [_post(server, filler).status_code for _ in range(30)]
    assert statuses[0] == 200
    assert 503 in statuses
    shed = _post(server, filler)
    assert shed.status_code == 503 and shed.headers["Retry-After"] == "10"
    time.sleep(0.6)  # the spool's size is measured at most every 0.5 s
    ready = requests.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["mlflow_reachable"] is False and ready.json()["spool_has_room"] is False
    spool_bytes = server.service.usage.bytes()
    assert spool_bytes <= 1 << 20  # bounded by configuration
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200


def test_memory_over_its_limit_with_a_backlog_is_503(in_process, monkeypatch):
    from genai_mlflow.collector import service

    monkeypatch.setattr(service, "MEMORY_BACKLOG_BYTES", -1)  # any spool counts as a backlog
    server = in_process(max_memory_bytes=1)
    shed = _post(server, request_of(llm_span()).SerializeToString())
    assert shed.status_code == 503 and shed.headers["Retry-After"] == "10"
    assert server.service.metrics.shed.value("memory") == 1
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 503  # and MLflow is down
    assert server.service.memory.rss() > 10 << 20


def test_connections_over_the_limit_are_refused(in_process):
    server = in_process(max_connections=1)
    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port)) as first:
        first.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in first.recv(1024)  # and the connection stays open (keep-alive)
        with socket.create_connection((host, port)) as second:
            second.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"503" in second.recv(1024)
    assert server.service.metrics.shed.value("connections") == 1


# --- graceful shutdown ----------------------------------------------------------------------------


def test_sigterm_stops_accepting_then_flushes_within_the_grace_period(
    mlflow_server: MlflowStack, tmp_path: Path, persona
):
    running = start_collector(mlflow_server, tmp_path / "c", "--grace", "20")
    spans = [llm_span(persona=persona) for _ in range(20)]
    for start in range(0, 20, 5):
        assert running.post(request_of(*spans[start : start + 5]).SerializeToString()).status_code == 200
    started = time.monotonic()
    assert stop_collector(running, timeout_s=25) == 0
    assert time.monotonic() - started < 20
    log = running.log()
    assert "stopping" in log and "everything landed" in log, log
    traces = wait_for_traces(mlflow_server, f"{persona}_{today()}", 20, timeout_s=5)
    assert len(traces) == 20
    with pytest.raises(requests.ConnectionError):
        running.get("/healthz")
