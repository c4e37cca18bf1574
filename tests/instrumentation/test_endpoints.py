"""The Responses API, embeddings and legacy completions."""

from __future__ import annotations

import openai
import pydantic
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genai_mlflow import semconv as sc

from .spans import json_attr, only_span

FUNCTION_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_responses_create(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    response = client.responses.create(
        model="gpt-4o-mini",
        input="What is 2+2?",
        instructions="Be brief.",
        max_output_tokens=40,
        temperature=0,
    )
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini"
    assert attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] == 40
    assert attrs[sc.OPENAI_API_TYPE] == "responses"
    assert attrs[sc.GEN_AI_RESPONSE_ID] == response.id
    assert attrs[sc.GEN_AI_RESPONSE_MODEL] == response.model
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    assert response.usage is not None
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == response.usage.input_tokens
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == response.usage.output_tokens
    assert attrs[sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == response.usage.input_tokens_details.cached_tokens
    assert (
        attrs[sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS]
        == response.usage.output_tokens_details.reasoning_tokens
    )
    assert json_attr(span, sc.GEN_AI_SYSTEM_INSTRUCTIONS) == [{"type": "text", "content": "Be brief."}]
    assert json_attr(span, sc.GEN_AI_INPUT_MESSAGES) == [
        {"role": "user", "parts": [{"type": "text", "content": "What is 2+2?"}]}
    ]
    assert json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)[0]["parts"] == [
        {"type": "text", "content": response.output_text}
    ]


def test_responses_tool_call(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    response = client.responses.create(model="gpt-4o-mini", input="Weather in Paris?", tools=[FUNCTION_TOOL])
    calls = [item for item in response.output if item.type == "function_call"]
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("tool_calls",)
    assert list(attrs[sc.GENAI_MLFLOW_TOOL_CALL_IDS]) == [c.call_id for c in calls]  # type: ignore[union-attr]
    assert json_attr(span, sc.GEN_AI_TOOL_DEFINITIONS)[0]["name"] == "get_weather"


def test_responses_stream(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    events = list(client.responses.create(model="gpt-4o-mini", input="Count to three", stream=True))
    completed = next(e for e in events if e.type == "response.completed").response  # type: ignore[union-attr]
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert attrs[sc.GEN_AI_REQUEST_STREAM] is True
    assert attrs[sc.GEN_AI_RESPONSE_ID] == completed.id
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == completed.usage.output_tokens  # type: ignore[union-attr]
    assert sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK in attrs
    assert json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)[0]["parts"][0]["content"] == completed.output_text


def test_responses_stream_helper_is_one_span(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    with client.responses.stream(model="gpt-4o-mini", input="Count to three") as stream:
        final = stream.get_final_response()
    assert only_span(span_exporter).attributes[sc.GEN_AI_RESPONSE_ID] == final.id  # type: ignore[index]


class Capital(pydantic.BaseModel):
    country: str
    capital: str


def test_responses_parse(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    parsed = client.responses.parse(model="gpt-4o-mini", input="Capital of France?", text_format=Capital)
    assert isinstance(parsed.output_parsed, Capital)
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_OUTPUT_TYPE] == "json"
    assert attrs[sc.GEN_AI_RESPONSE_ID] == parsed.id


async def test_async_responses_stream(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    async with async_client.responses.stream(model="gpt-4o-mini", input="hi") as stream:
        final = await stream.get_final_response()
    assert only_span(span_exporter).attributes[sc.GEN_AI_RESPONSE_ID] == final.id  # type: ignore[index]


def test_embeddings(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=8)
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert span.name == "embeddings text-embedding-3-small"
    assert attrs[sc.GEN_AI_OPERATION_NAME] == "embeddings"
    assert attrs[sc.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] == len(result.data[0].embedding) == 8
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == result.usage.prompt_tokens
    assert sc.GEN_AI_RESPONSE_FINISH_REASONS not in attrs


def test_embeddings_encoding_format(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    client.embeddings.create(model="text-embedding-3-small", input="hello", encoding_format="float")
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_REQUEST_ENCODING_FORMATS] == ("float",)


async def test_async_embeddings(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    await async_client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert only_span(span_exporter).attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] > 0  # type: ignore[index,operator]


def test_legacy_completion(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    result = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say this is a test", max_tokens=7
    )
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert attrs[sc.GEN_AI_OPERATION_NAME] == "text_completion"
    assert attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] == 7
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == (result.choices[0].finish_reason,)
    assert json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)[0]["parts"][0]["content"] == result.choices[0].text
