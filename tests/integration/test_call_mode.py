"""Mode ``call`` against a real MLflow server: what a user finds through ``MlflowClient``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import openai
import pytest
from mlflow import MlflowClient
from opentelemetry import trace

import genai_mlflow
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.setup import Handle
from tests.mlflow_stack import MlflowStack

TODAY = datetime.now(UTC).strftime("%Y-%m-%d")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _experiment(client: MlflowClient, persona: str):
    experiment = client.get_experiment_by_name(f"{persona}_{TODAY}")
    assert experiment is not None, f"no experiment {persona}_{TODAY}"
    return experiment


def test_each_call_is_a_run_with_a_linked_trace(
    handle: Handle, client: openai.OpenAI, mlflow_env: MlflowStack, persona_name: str
):
    with genai_mlflow.persona(persona_name):
        answer = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"},
            ],
            temperature=0.3,
            max_tokens=40,
        )
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Count to five"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="does-not-exist", messages=[{"role": "user", "content": "hi"}]
            )
    assert handle.flush(60)

    mlflow = mlflow_env.client()
    experiment = _experiment(mlflow, persona_name)
    assert experiment.tags["genai_mlflow.persona"] == persona_name
    assert experiment.tags["genai_mlflow.date"] == TODAY
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 3

    first = runs[0]
    assert first.info.status == "FINISHED"
    assert first.info.run_name == "chat gpt-4o-mini"
    assert first.data.params["model"] == answer.model
    assert first.data.params["provider"] == "openai"
    assert first.data.params["operation"] == "chat"
    assert first.data.params["request.temperature"] == "0.3"
    assert first.data.params["request.max_tokens"] == "40"
    usage = answer.usage
    assert usage is not None
    assert first.data.metrics["prompt_tokens"] == usage.prompt_tokens
    assert first.data.metrics["completion_tokens"] == usage.completion_tokens
    assert first.data.metrics["total_tokens"] == usage.total_tokens
    assert first.data.metrics["llm_calls"] == 1
    assert first.data.metrics["latency_ms"] > 0
    expected_cost = PriceTable.load().cost(answer.model, usage.prompt_tokens, usage.completion_tokens)
    assert expected_cost is not None
    assert first.data.metrics["cost_usd"] == pytest.approx(expected_cost.total_cost)
    assert first.data.tags["genai_mlflow.persona"] == persona_name
    assert first.data.tags["finish_reasons"] == "stop"

    streamed = runs[1]
    assert streamed.data.metrics["time_to_first_token_ms"] > 0
    failed = runs[2]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error.type"] == "NotFoundError"

    traces = mlflow.search_traces(locations=[experiment.experiment_id], run_id=first.info.run_id)
    assert len(traces) == 1
    info = traces[0].info
    assert info.trace_id == "tr-" + first.data.tags["genai_mlflow.trace_id"]
    assert info.request_preview == "What is 2+2?"
    assert info.response_preview == answer.choices[0].message.content
    assert info.token_usage["input_tokens"] == usage.prompt_tokens
    assert info.token_usage["output_tokens"] == usage.completion_tokens
    assert info.cost["total_cost"] == pytest.approx(first.data.metrics["cost_usd"])
    [span] = traces[0].data.spans
    assert span.span_type == "CHAT_MODEL"
    assert "What is 2+2?" in json.dumps(span.attributes["gen_ai.input.messages"])
    all_traces = mlflow.search_traces(locations=[experiment.experiment_id])
    assert len(all_traces) == 3


def test_a_web_request_with_two_calls_is_one_run_and_one_trace(
    handle: Handle, client: openai.OpenAI, mlflow_env: MlflowStack, persona_name: str
):
    tracer = trace.get_tracer("app")
    with genai_mlflow.persona(persona_name), tracer.start_as_current_span("POST /plan") as request_span:
        first = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Umbrella for Lyon?"}], tools=[WEATHER_TOOL]
        )
        with tracer.start_as_current_span("db.lookup"):
            pass
        client.chat.completions.create(
            model="gpt-4o",
            messages=[
                {"role": "user", "content": "Umbrella for Lyon?"},
                first.choices[0].message,
                {
                    "role": "tool",
                    "tool_call_id": first.choices[0].message.tool_calls[0].id,
                    "content": "rain",
                },
            ],
            tools=[WEATHER_TOOL],
        )
    assert handle.flush(60)
    mlflow = mlflow_env.client()
    experiment = _experiment(mlflow, persona_name)
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.info.run_name == "POST /plan"
    assert run.data.metrics["llm_calls"] == 2
    assert run.data.tags["finish_reasons"] == "tool_calls,stop"
    trace_id = format(request_span.get_span_context().trace_id, "032x")
    assert run.data.tags["genai_mlflow.trace_id"] == trace_id
    [found] = mlflow.search_traces(locations=[experiment.experiment_id], run_id=run.info.run_id)
    assert {s.name for s in found.data.spans} == {"POST /plan", "chat gpt-4o", "db.lookup"}
    assert len(found.data.spans) == 4
    assert found.info.request_preview == "Umbrella for Lyon?"
    assert found.info.state.name == "OK"
