"""``genai-mlflow demo``: personas make real OpenAI-client calls against a local OpenAI-compatible
server; every call lands in MLflow (the embedded ``sqlite:///mlflow.db`` unless
``MLFLOW_TRACKING_URI`` says otherwise), and the demo prints what landed."""

from __future__ import annotations

import sys
from typing import TextIO

import openai
from openai.types.chat import ChatCompletionFunctionToolParam
from opentelemetry import trace

import genai_mlflow
from genai_mlflow.testing.openai_server import OpenAIServer

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _calls(client: openai.OpenAI, out: TextIO) -> int:
    """The personas' calls; returns how many LLM calls were made."""
    with genai_mlflow.persona("viral_creator"):
        with genai_mlflow.prompt("post_writer", 1):  # two prompt versions, for `genai-mlflow compare`
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[
                    {"role": "system", "content": "You write short, catchy posts."},
                    {"role": "user", "content": "A post about autumn in Paris"},
                ],
            )
        with genai_mlflow.prompt("post_writer", 2):
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Three hashtags for a coffee shop"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            for _ in stream:
                pass
    with genai_mlflow.persona("travel_agent"), genai_mlflow.session("trip-42", user_id="ada"):
        # One request of the app, two LLM calls: one run, one trace.
        with trace.get_tracer("demo").start_as_current_span("plan_trip"):
            first = client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "Should I pack an umbrella for Lyon?"}],
                tools=[WEATHER_TOOL],
            )
            call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
            client.chat.completions.create(
                model="gpt-4o",
                messages=[
                    {"role": "user", "content": "Should I pack an umbrella for Lyon?"},
                    first.choices[0].message,  # type: ignore[list-item]
                    {"role": "tool", "tool_call_id": call.id, "content": "Light rain, 14°C"},
                ],
                tools=[WEATHER_TOOL],
            )
        try:
            client.chat.completions.create(
                model="does-not-exist", messages=[{"role": "user", "content": "hi"}]
            )
        except openai.NotFoundError as exc:
            print(f"(a failing call, on purpose: {exc.status_code} model_not_found)", file=out)
    return 5


def _report(tracking_uri: str, out: TextIO) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments(filter_string="tags.`genai_mlflow.persona` != ''")
    print(f"\nLanded in {tracking_uri}:", file=out)
    for experiment in sorted(experiments, key=lambda e: e.name):
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        traces = client.search_traces(locations=[experiment.experiment_id])
        print(f"  experiment {experiment.name}: {len(runs)} runs, {len(traces)} traces", file=out)
        for run in runs:
            metrics = run.data.metrics
            print(
                f"    {run.info.run_name:<28} {run.info.status:<9}"
                f" calls={int(metrics.get('llm_calls', 0))}"
                f" tokens={int(metrics.get('total_tokens', 0)):<5}"
                f" cost=${metrics.get('cost_usd', 0.0):.6f}"
                f" latency={metrics.get('latency_ms', 0.0):.0f}ms",
                file=out,
            )
    print(f"\nOpen them in the MLflow UI:\n  mlflow ui --backend-store-uri {tracking_uri}", file=out)
    print(
        "Compare the prompt versions (a demo has too few calls for a verdict):\n"
        f"  genai-mlflow compare --tracking-uri {tracking_uri} --persona viral_creator --since 1d",
        file=out,
    )


def run_demo(tracking_uri: str | None = None, out: TextIO = sys.stdout) -> int:
    handle = genai_mlflow.instrument(tracking_uri)
    settings = handle.settings
    if settings is None:
        print("genai-mlflow is disabled (GENAI_MLFLOW_DISABLED); nothing to show.", file=out)
        return 0
    with OpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="demo", max_retries=0)
        calls = _calls(client, out)
    print(f"{calls} LLM calls made; waiting for them to land in MLflow...", file=out)
    landed = handle.flush(120)
    _report(settings.tracking_uri, out)
    handle.shutdown()
    if not landed:
        print("Not everything landed in time: run `genai-mlflow doctor`.", file=out)
        return 1
    return 0
