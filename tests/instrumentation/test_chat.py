"""Chat completions, non-streaming: what a user reads on the span, attribute by attribute."""

from __future__ import annotations

import openai
import pydantic
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from genai_mlflow import semconv as sc
from genai_mlflow.testing.openai_server import OpenAIServer

from .compat import chat_helpers
from .spans import json_attr, only_span

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello"},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def test_chat_span_has_request_response_and_usage(
    instrumented, client: openai.OpenAI, server: OpenAIServer, span_exporter: InMemorySpanExporter
):
    result = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        seed=7,
        stop="END",
        frequency_penalty=0.1,
        presence_penalty=0.3,
        reasoning_effort="low",
        service_tier="default",
        user="u-1",
    )
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert attrs[sc.GEN_AI_OPERATION_NAME] == "chat"
    assert attrs[sc.GEN_AI_PROVIDER_NAME] == "openai"
    assert attrs[sc.OPENAI_API_TYPE] == "chat_completions"
    assert attrs[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert attrs[sc.GEN_AI_REQUEST_MAX_TOKENS] == 50
    assert attrs[sc.GEN_AI_REQUEST_TEMPERATURE] == 0.2
    assert attrs[sc.GEN_AI_REQUEST_TOP_P] == 0.9
    assert attrs[sc.GEN_AI_REQUEST_SEED] == 7
    assert attrs[sc.GEN_AI_REQUEST_STOP_SEQUENCES] == ("END",)
    assert attrs[sc.GEN_AI_REQUEST_FREQUENCY_PENALTY] == 0.1
    assert attrs[sc.GEN_AI_REQUEST_PRESENCE_PENALTY] == 0.3
    assert attrs["gen_ai.request.reasoning_effort"] == "low"
    assert attrs["gen_ai.request.user"] == "u-1"
    assert attrs[sc.OPENAI_REQUEST_SERVICE_TIER] == "default"
    assert attrs[sc.GEN_AI_REQUEST_STREAM] is False
    assert sc.GEN_AI_REQUEST_CHOICE_COUNT not in attrs
    assert attrs[sc.GEN_AI_RESPONSE_ID] == result.id
    assert attrs[sc.GEN_AI_RESPONSE_MODEL] == result.model
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    assert result.usage is not None
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == result.usage.prompt_tokens
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == result.usage.completion_tokens
    assert sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS in attrs
    assert sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS in attrs
    assert attrs[sc.SERVER_ADDRESS] == "127.0.0.1"
    assert attrs[sc.SERVER_PORT] == server.port
    assert sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK not in attrs

    assert json_attr(span, sc.GEN_AI_SYSTEM_INSTRUCTIONS) == [{"type": "text", "content": "You are terse."}]
    assert json_attr(span, sc.GEN_AI_INPUT_MESSAGES) == [
        {"role": "user", "parts": [{"type": "text", "content": "Say hello"}]}
    ]
    assert json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": result.choices[0].message.content}],
            "finish_reason": "stop",
        }
    ]


def test_no_content_by_default(instrument, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    instrument()
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL])
    attrs = dict(only_span(span_exporter).attributes or {})
    for key in (sc.GEN_AI_INPUT_MESSAGES, sc.GEN_AI_OUTPUT_MESSAGES, sc.GEN_AI_SYSTEM_INSTRUCTIONS):
        assert key not in attrs
    # Tool names and call ids are not content; their arguments are.
    assert attrs[sc.GENAI_MLFLOW_TOOL_CALL_NAMES] == ("get_weather",)
    assert json_attr(only_span(span_exporter), sc.GEN_AI_TOOL_DEFINITIONS) == [
        {"type": "function", "name": "get_weather"}
    ]


def test_tool_calls_and_multiple_choices(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL], n=2)
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert attrs[sc.GEN_AI_REQUEST_CHOICE_COUNT] == 2
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("tool_calls", "tool_calls")
    ids = [c.id for choice in result.choices for c in (choice.message.tool_calls or [])]
    assert list(attrs[sc.GENAI_MLFLOW_TOOL_CALL_IDS]) == ids
    definitions = json_attr(span, sc.GEN_AI_TOOL_DEFINITIONS)
    assert definitions[0]["parameters"]["required"] == ["city"]
    output = json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)
    assert len(output) == 2
    call = output[0]["parts"][0]
    first = result.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call["type"] == "tool_call"
    assert call["id"] == first.id
    assert call["name"] == "get_weather"
    assert isinstance(call["arguments"], dict) and "city" in call["arguments"]


def test_tool_round_trip_input_messages(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    first = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL])
    message = first.choices[0].message  # a pydantic object, passed back as users do
    call_id = message.tool_calls[0].id  # type: ignore[index]
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[*MESSAGES, message, {"role": "tool", "tool_call_id": call_id, "content": "sunny"}],  # type: ignore[list-item]
        tools=[WEATHER_TOOL],
    )
    second = span_exporter.get_finished_spans()[1]
    inputs = json_attr(second, sc.GEN_AI_INPUT_MESSAGES)
    assert [m["role"] for m in inputs] == ["user", "assistant", "tool"]
    assert inputs[1]["parts"][0]["type"] == "tool_call"
    assert inputs[1]["parts"][0]["id"] == call_id
    assert inputs[2]["parts"] == [{"type": "tool_call_response", "id": call_id, "response": "sunny"}]


class Answer(pydantic.BaseModel):
    city: str
    temperature: int


def test_parse_is_one_span_with_json_output(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    parsed = chat_helpers(client).parse(model="gpt-4o-mini", messages=MESSAGES, response_format=Answer)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert span.name == "chat gpt-4o-mini"
    assert attrs[sc.GEN_AI_OUTPUT_TYPE] == "json"
    assert attrs[sc.GEN_AI_RESPONSE_ID] == parsed.id
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] > 0


async def test_async_chat(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    result = await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_RESPONSE_ID] == result.id
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == result.usage.completion_tokens  # type: ignore[union-attr]


async def test_async_parse(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    parsed = await chat_helpers(async_client).parse(
        model="gpt-4o-mini", messages=MESSAGES, response_format=Answer
    )
    assert only_span(span_exporter).attributes[sc.GEN_AI_RESPONSE_ID] == parsed.id  # type: ignore[index]


def test_azure_provider(instrumented, server: OpenAIServer, span_exporter: InMemorySpanExporter):
    azure = openai.AzureOpenAI(
        azure_endpoint=server.base_url.removesuffix("/v1"),
        api_key="k",
        api_version="2024-10-21",
        max_retries=0,
    )
    azure.chat.completions.create(model="my-deployment", messages=MESSAGES)
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_PROVIDER_NAME] == "azure.ai.openai"
    assert attrs[sc.SERVER_ADDRESS] == "127.0.0.1"


@pytest.mark.parametrize("omitted", [openai.NOT_GIVEN, None])
def test_omitted_parameters_are_not_reported(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter, omitted
):
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=omitted, seed=omitted)
    attrs = dict(only_span(span_exporter).attributes or {})
    assert sc.GEN_AI_REQUEST_TEMPERATURE not in attrs
    assert sc.GEN_AI_REQUEST_SEED not in attrs
