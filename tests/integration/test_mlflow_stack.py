"""The MLflow stack of ``tests/mlflow_stack.py`` is real: PostgreSQL rows, S3 objects, restarts, OTLP."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import mlflow
import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.mlflow_stack import MlflowStack


def _experiment(stack: MlflowStack) -> str:
    experiment_id: str = stack.client().create_experiment(f"stack-test-{uuid.uuid4().hex}")
    return experiment_id


def _health(stack: MlflowStack) -> int | None:
    try:
        with urllib.request.urlopen(f"{stack.tracking_uri}/health", timeout=2) as resp:
            status: int = resp.status
            return status
    except (urllib.error.URLError, OSError):
        return None


def _bucket_keys(stack: MlflowStack) -> list[str]:
    listing = stack.s3_client().list_objects_v2(Bucket=stack.bucket)
    return [obj["Key"] for obj in listing.get("Contents", [])]


def test_runs_live_in_postgres_and_artifacts_in_moto_s3(mlflow_server: MlflowStack, tmp_path: Path) -> None:
    client = mlflow_server.client()
    experiment_id = _experiment(mlflow_server)
    run_id = client.create_run(experiment_id, tags={"genai_mlflow.trace_id": "t-1"}).info.run_id
    client.log_param(run_id, "model", "gpt-4o-mini")
    client.log_metric(run_id, "input_tokens", 12)
    report = tmp_path / "report.txt"
    report.write_text("hello from the stack")
    client.log_artifact(run_id, str(report))

    # The run's rows are in this session's PostgreSQL database.
    with psycopg.connect(mlflow_server.db_url) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
        param = conn.execute(
            "SELECT value FROM params WHERE run_uuid = %s AND key = 'model'", (run_id,)
        ).fetchone()
    assert row == ("RUNNING",)
    assert param == ("gpt-4o-mini",)

    # The artifact went through the server's proxy into the moto bucket.
    assert f"artifacts/{experiment_id}/{run_id}/artifacts/report.txt" in _bucket_keys(mlflow_server)
    assert [f.path for f in client.list_artifacts(run_id)] == ["report.txt"]

    # Runs can be found by tag.
    found = client.search_runs([experiment_id], filter_string="tags.`genai_mlflow.trace_id` = 't-1'")
    assert [r.info.run_id for r in found] == [run_id]


def test_restart_keeps_data_on_the_same_port(mlflow_server: MlflowStack, tmp_path: Path) -> None:
    client = mlflow_server.client()
    experiment_id = _experiment(mlflow_server)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "latency_ms", 42.0)
    (tmp_path / "notes.txt").write_text("persisted")
    client.log_artifact(run_id, str(tmp_path / "notes.txt"))
    uri_before = mlflow_server.tracking_uri

    started = time.monotonic()
    mlflow_server.stop_mlflow()
    stopped_in = time.monotonic() - started
    try:
        assert not mlflow_server.running
        assert _health(mlflow_server) is None  # nothing listens any more
    finally:
        mlflow_server.start_mlflow()

    assert stopped_in < 10
    assert mlflow_server.tracking_uri == uri_before
    assert _health(mlflow_server) == 200
    run = client.get_run(run_id)
    assert run.data.metrics == {"latency_ms": 42.0}
    downloaded = client.download_artifacts(run_id, "notes.txt", str(tmp_path / "down"))
    assert Path(downloaded).read_text() == "persisted"


def test_outage_context_restarts_even_on_error(mlflow_server: MlflowStack) -> None:
    with pytest.raises(RuntimeError, match="boom"), mlflow_server.outage(grace=0):
        assert _health(mlflow_server) is None
        raise RuntimeError("boom")
    assert _health(mlflow_server) == 200


def test_mlflow_env_configures_a_default_client(mlflow_env: MlflowStack) -> None:
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_env.tracking_uri
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == mlflow_env.s3_endpoint
    experiment_id = _experiment(mlflow_env)
    assert mlflow.MlflowClient().get_experiment(experiment_id).experiment_id == experiment_id


# --- OTLP ingest (see docs/mlflow-otlp-notes.md) ---------------------------------------------------


def _any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    array = AnyValue()
    array.array_value.values.extend(_any_value(v) for v in value)
    return array


def _otlp_request(trace_id: bytes, span_id: bytes, attributes: dict[str, Any]) -> bytes:
    start = time.time_ns()
    span = Span(
        trace_id=trace_id,
        span_id=span_id,
        name="chat gpt-4o-mini",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 250_000_000,
        status=Status(code=Status.STATUS_CODE_OK),
    )
    span.attributes.extend(KeyValue(key=k, value=_any_value(v)) for k, v in attributes.items())
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value="stack-test"))
    )
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "genai_mlflow"
    scope_spans.spans.append(span)
    body: bytes = request.SerializeToString()
    return body


def _post_otlp(stack: MlflowStack, body: bytes, experiment_id: str, run_id: str) -> int:
    request = urllib.request.Request(
        f"{stack.tracking_uri}/v1/traces",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/x-protobuf",
            "x-mlflow-experiment-id": experiment_id,
            "x-mlflow-run-id": run_id,
        },
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        status: int = resp.status
        return status


def test_otlp_trace_is_linked_to_run_with_usage_and_posting_twice_keeps_one(
    mlflow_server: MlflowStack,
) -> None:
    client = mlflow_server.client()
    experiment_id = _experiment(mlflow_server)
    run_id = client.create_run(experiment_id).info.run_id
    trace_id, span_id = os.urandom(16), os.urandom(8)
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3,
        "gen_ai.input.messages": json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "What is 2+2?"}]}]
        ),
        "gen_ai.output.messages": json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "4"}], "finish_reason": "stop"}]
        ),
        # Readable previews: MLflow extracts the last user / assistant message from these shapes.
        "mlflow.spanInputs": json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}]}),
        "mlflow.spanOutputs": json.dumps({"choices": [{"message": {"role": "assistant", "content": "4"}}]}),
        "session.id": "session-1",
        "user.id": "alice",
        "mlflow.traceTag.genai_mlflow.run_key": "abc",
    }
    body = _otlp_request(trace_id, span_id, attributes)

    assert _post_otlp(mlflow_server, body, experiment_id, run_id) == 200
    assert _post_otlp(mlflow_server, body, experiment_id, run_id) == 200  # same trace again

    traces = client.search_traces(locations=[experiment_id], run_id=run_id)
    assert len(traces) == 1
    info = traces[0].info
    assert info.trace_id == f"tr-{trace_id.hex()}"
    assert info.token_usage == {"input_tokens": 12, "output_tokens": 3, "total_tokens": 15}
    assert info.request_preview == "What is 2+2?"
    assert info.response_preview == "4"
    assert info.trace_metadata["mlflow.trace.session"] == "session-1"
    assert info.trace_metadata["mlflow.trace.user"] == "alice"
    assert set(json.loads(info.trace_metadata["mlflow.trace.cost"])) == {
        "input_cost",
        "output_cost",
        "total_cost",
    }
    assert info.tags["genai_mlflow.run_key"] == "abc"
    assert info.tags["service.name"] == "stack-test"
    assert "mlflow.sourceRun" not in info.trace_metadata  # the run link is an entity association
    span = traces[0].data.spans[0]
    assert span.span_type == "CHAT_MODEL"
    assert len(traces[0].data.spans) == 1
