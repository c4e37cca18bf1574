"""``genai-mlflow demo``: personas making real OpenAI-client calls against a local server."""

from __future__ import annotations

import openai
from openai.types.chat import ChatCompletionFunctionToolParam
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

import genai_mlflow
from genai_mlflow import OpenAIInstrumentor
from genai_mlflow.testing.openai_server import OpenAIServer

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _calls(client: openai.OpenAI) -> None:
    with genai_mlflow.persona("viral_creator"):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "system", "content": "You write short, catchy posts."},
                {"role": "user", "content": "A post about autumn in Paris"},
            ],
        )
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Three hashtags for a coffee shop"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        for _ in stream:
            pass
    with genai_mlflow.persona("travel_agent"), genai_mlflow.session("trip-42", user_id="ada"):
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Should I pack an umbrella for Lyon?"}],
            tools=[WEATHER_TOOL],
        )
        try:
            client.chat.completions.create(
                model="does-not-exist", messages=[{"role": "user", "content": "hi"}]
            )
        except openai.NotFoundError as exc:
            print(f"(expected failure: {exc.status_code} model_not_found)")


def run_demo() -> int:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider, capture_content=True)
    try:
        with OpenAIServer() as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="demo", max_retries=0)
            _calls(client)
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    return 0
