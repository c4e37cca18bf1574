"""End to end: instrumented apps and a raw OTLP JSON sender, all through one collector, every call
landing in its persona's experiment of the day."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from genai_mlflow.testing.openai_server import OpenAIServer
from tests.collector.conftest import CollectorProcess, today, wait_for_traces
from tests.mlflow_stack import MlflowStack

ROOT = Path(__file__).resolve().parents[2]
CALLS = 4


def _start_app(
    style: str, persona: str, collector: CollectorProcess, server: OpenAIServer
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "tests.collector.instrumented_app", "--style", style, "--persona", persona,
        "--calls", str(CALLS), "--collector", collector.url, "--token", collector.token or "",
        "--openai-url", server.base_url,
    ]  # fmt: skip
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(app: subprocess.Popen[bytes]) -> None:
    output, _ = app.communicate(timeout=90)
    assert app.returncode == 0, output.decode(errors="replace")


def _legacy_json_trace(persona: str, index: int) -> dict:
    """One call in OpenLLMetry's older attribute style, the persona on the span, as OTLP JSON."""
    now = time.time_ns()

    def attribute(key: str, value: object) -> dict:
        if isinstance(value, int):
            return {"key": key, "value": {"intValue": str(value)}}
        return {"key": key, "value": {"stringValue": value}}

    attributes = {
        "gen_ai.system": "OpenAI",
        "llm.request.type": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.prompt_tokens": 20 + index,
        "gen_ai.usage.completion_tokens": 5,
        "gen_ai.prompt.0.role": "user",
        "gen_ai.prompt.0.content": f"raw question {index}",
        "gen_ai.completion.0.role": "assistant",
        "gen_ai.completion.0.content": f"raw answer {index}",
        "gen_ai.completion.0.finish_reason": "stop",
        "gen_ai.agent.name": persona,
    }
    return {
        "traceId": os.urandom(16).hex(),
        "spanId": os.urandom(8).hex(),
        "name": "openai.chat",
        "kind": 3,
        "startTimeUnixNano": str(now),
        "endTimeUnixNano": str(now + 250_000_000),
        "attributes": [attribute(k, v) for k, v in attributes.items()],
    }


def test_two_apps_and_a_raw_sender_land_in_their_persona_experiments(
    collector: CollectorProcess, mlflow_server: MlflowStack, openai_server: OpenAIServer
):
    tag = uuid.uuid4().hex[:6]
    personas = {"scope": f"scoped_{tag}", "resource": f"resourced_{tag}", "raw": f"raw_sender_{tag}"}
    apps = [_start_app(style, personas[style], collector, openai_server) for style in ("scope", "resource")]

    spans = [_legacy_json_trace(personas["raw"], i) for i in range(CALLS)]
    document = {
        "resourceSpans": [{"resource": {}, "scopeSpans": [{"scope": {"name": "raw"}, "spans": spans}]}]
    }
    body = gzip.compress(json.dumps(document).encode())
    response = collector.post(body, "application/json", **{"Content-Encoding": "gzip"})
    assert response.status_code == 200 and response.json() == {}
    for app in apps:
        _finish(app)

    client = mlflow_server.client()
    for style, persona in personas.items():
        traces = wait_for_traces(mlflow_server, f"{persona}_{today()}", CALLS)
        assert len(traces) == CALLS, style
        experiment = client.get_experiment_by_name(f"{persona}_{today()}")
        assert experiment.tags["genai_mlflow.persona"] == persona
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == CALLS, style
        assert all(run.data.metrics["llm_calls"] == 1 for run in runs)
        assert all(run.data.metrics["prompt_tokens"] > 0 for run in runs)
        assert collector.metric("genai_tokens_total", persona=persona, model=_model(runs), type="input") > 0

    # The web app's traces are whole: its request span is the root, the LLM call inside it.
    resource_experiment = client.get_experiment_by_name(f"{personas['resource']}_{today()}")
    for trace in client.search_traces(locations=[resource_experiment.experiment_id]):
        names = sorted(s.name for s in client.get_trace(trace.info.trace_id).data.spans)
        assert names[0].startswith("GET /ask/") and names[1] == "chat gpt-4o-mini", names

    # The raw sender's older attributes were translated: previews show its text.
    raw_experiment = client.get_experiment_by_name(f"{personas['raw']}_{today()}")
    previews = {
        t.info.request_preview for t in client.search_traces(locations=[raw_experiment.experiment_id])
    }
    assert previews == {f"raw question {i}" for i in range(CALLS)}


def _json_span(trace_id: str, span_id: str, name: str, kind: int, parent: str = "", **extra: object) -> dict:
    now = time.time_ns()
    span: dict = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": kind,
        "startTimeUnixNano": str(now - 300_000_000),
        "endTimeUnixNano": str(now),
        **extra,
    }
    if parent:
        span["parentSpanId"] = parent
    return span


def _service_part(service: str, spans: list[dict]) -> bytes:
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]}
    document = {"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": spans}]}]}
    return json.dumps(document).encode()


def test_a_trace_from_two_services_lands_as_one(collector: CollectorProcess, mlflow_server: MlflowStack):
    """The called service's part comes first (whole on its own: its root's parent is remote), the
    caller's two seconds later; they land as one trace and one run."""
    persona = f"two_services_{uuid.uuid4().hex[:6]}"
    trace_id = os.urandom(16).hex()
    front, client_span, answer, llm = (os.urandom(8).hex() for _ in range(4))
    remote = 0x300  # OTLP span flags: the parent's remoteness is known, and it is remote
    llm_attributes = [
        {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
        {"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}},
        {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o-mini"}},
        {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "20"}},
        {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "5"}},
        {"key": "gen_ai.agent.name", "value": {"stringValue": persona}},
    ]
    called = [
        _json_span(trace_id, answer, "POST /answer", 2, client_span, flags=remote),
        _json_span(trace_id, llm, "chat gpt-4o-mini", 3, answer, attributes=llm_attributes),
    ]
    caller = [_json_span(trace_id, front, "GET /ask", 2), _json_span(trace_id, client_span, "POST", 3, front)]
    for part in (_service_part("answerer", called), _service_part("front", caller)):
        response = collector.post(part, "application/json")
        assert response.status_code == 200 and response.json() == {}
        time.sleep(2.0)

    (trace,) = wait_for_traces(mlflow_server, f"{persona}_{today()}", 1)
    client = mlflow_server.client()
    names = sorted(s.name for s in client.get_trace(trace.info.trace_id).data.spans)
    assert names == ["GET /ask", "POST", "POST /answer", "chat gpt-4o-mini"]
    experiment = client.get_experiment_by_name(f"{persona}_{today()}")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "GET /ask"
    assert run.data.metrics["llm_calls"] == 1 and run.data.metrics["prompt_tokens"] == 20
    late = [
        line
        for line in collector.get("/metrics").text.splitlines()
        if line.startswith("genai_collector_late")
    ]
    assert late == ["genai_collector_late_spans_total 0"], late


def _model(runs) -> str:
    (model,) = {str(run.data.params["model"]) for run in runs}
    return model


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.instrumentation.genai") is None,
    reason="opentelemetry-instrumentation-genai-openai is not installed (benchmarks/requirements.txt)",
)
def test_the_official_openai_instrumentation(
    collector: CollectorProcess, mlflow_server: MlflowStack, openai_server: OpenAIServer
):
    persona = f"official_{uuid.uuid4().hex[:6]}"
    _finish(_start_app("official", persona, collector, openai_server))
    traces = wait_for_traces(mlflow_server, f"{persona}_{today()}", CALLS)
    assert len(traces) == CALLS
    assert (
        collector.metric("genai_tokens_total", persona=persona, model="gpt-4o-mini-2024-07-18", type="input")
        > 0
    )
