"""Streams: same chunks for the user, one span ended exactly once on every path."""

from __future__ import annotations

import asyncio
import gc

import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from genai_mlflow import semconv as sc
from genai_mlflow.testing.openai_server import OpenAIServer

from .compat import chat_helpers
from .spans import json_attr, only_span

MESSAGES = [{"role": "user", "content": "tell me a story about a fox"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "save",
            "parameters": {
                "type": "object",
                "properties": {"note": {"type": "string"}},
                "required": ["note"],
            },
        },
    },
]


def _without_ids(value):
    """Chunks with the per-request ids and timestamps taken out, to compare two runs."""
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in ("id", "created", "obfuscation")}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def test_stream_with_usage(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert isinstance(stream, openai.Stream)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert attrs[sc.GEN_AI_REQUEST_STREAM] is True
    assert attrs[sc.GEN_AI_RESPONSE_ID] == chunks[0].id
    assert attrs[sc.GEN_AI_RESPONSE_MODEL] == chunks[0].model
    assert attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] == usage.prompt_tokens
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == usage.completion_tokens
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
    ttfc = attrs[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK]
    assert isinstance(ttfc, float)
    assert 0 < ttfc * 1e9 <= span.end_time - span.start_time  # type: ignore[operator]
    assert json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)[0]["parts"] == [{"type": "text", "content": text}]
    assert span.status.status_code is StatusCode.UNSET


def test_stream_without_usage(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert all(c.usage is None for c in chunks)
    attrs = dict(only_span(span_exporter).attributes or {})
    assert sc.GEN_AI_USAGE_INPUT_TOKENS not in attrs
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)


def test_user_sees_the_same_chunks(instrument, client: openai.OpenAI, server: OpenAIServer):
    def read() -> list[dict]:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            n=2,
            tools=TOOLS,
            stream_options={"include_usage": True},
        )
        return [_without_ids(c.model_dump()) for c in stream]

    bare = read()
    instrument(capture_content=True)
    assert read() == bare


def test_streamed_tool_calls_and_choices(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    chunks = list(
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True, n=2, tools=TOOLS)
    )
    calls: dict[tuple[int, int], dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault((choice.index, delta.index), {"id": "", "name": "", "args": ""})
                entry["id"] = delta.id or entry["id"]
                if delta.function:
                    entry["name"] = delta.function.name or entry["name"]
                    entry["args"] += delta.function.arguments or ""
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("tool_calls", "tool_calls")
    expected = [calls[k] for k in sorted(calls)]
    assert list(attrs[sc.GENAI_MLFLOW_TOOL_CALL_IDS]) == [c["id"] for c in expected]
    assert list(attrs[sc.GENAI_MLFLOW_TOOL_CALL_NAMES]) == [c["name"] for c in expected]
    output = json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)
    assert len(output) == 2
    import json

    parts = [p for m in output for p in m["parts"]]
    assert [p["arguments"] for p in parts] == [json.loads(c["args"]) for c in expected]


def test_break_then_close(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    for _ in stream:
        break
    assert span_exporter.get_finished_spans() == ()
    stream.close()
    stream.close()
    span = only_span(span_exporter)
    assert span.status.status_code is StatusCode.UNSET
    assert sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK in (span.attributes or {})


def test_context_manager(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    with client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as stream:
        next(iter(stream))
    assert only_span(span_exporter).status.status_code is StatusCode.UNSET


def test_user_exception_inside_context_manager(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    class Boom(Exception):
        pass

    with (
        pytest.raises(Boom),
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as stream,
    ):
        for _ in stream:
            raise Boom("user code failed")
    span = only_span(span_exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})[
        sc.ERROR_TYPE
    ] == "test_user_exception_inside_context_manager.<locals>.Boom"


def test_garbage_collected_unfinished(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    def start() -> None:
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        next(iter(stream))

    start()
    gc.collect()
    assert len(span_exporter.get_finished_spans()) == 1


def test_server_cuts_the_stream(
    instrumented, client: openai.OpenAI, server: OpenAIServer, span_exporter: InMemorySpanExporter
):
    server.cut_stream_next(after_chunks=2)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    with pytest.raises(Exception) as raised:
        for _ in stream:
            pass
    span = only_span(span_exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})[sc.ERROR_TYPE] == type(raised.value).__qualname__


def test_error_event_mid_stream(
    instrumented, client: openai.OpenAI, server: OpenAIServer, span_exporter: InMemorySpanExporter
):
    server.error_event_next(after_chunks=1)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert only_span(span_exporter).attributes[sc.ERROR_TYPE] == "APIError"  # type: ignore[index]


def test_stream_helper_is_one_span(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    with chat_helpers(client).stream(model="gpt-4o-mini", messages=MESSAGES) as stream:
        final = stream.get_final_completion()
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert attrs[sc.GEN_AI_REQUEST_STREAM] is True
    assert attrs[sc.GEN_AI_RESPONSE_ID] == final.id
    assert (
        json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)[0]["parts"][0]["content"]
        == final.choices[0].message.content
    )


def test_stream_helper_left_early(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    with chat_helpers(client).stream(model="gpt-4o-mini", messages=MESSAGES) as stream:
        for _ in stream:
            break
    assert len(span_exporter.get_finished_spans()) == 1


async def test_async_stream(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    stream = await async_client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert isinstance(stream, openai.AsyncStream)
    chunks = [c async for c in stream]
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]
    assert sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK in attrs


async def test_async_break_and_close(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    stream = await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    async for _ in stream:
        break
    await stream.close()
    assert len(span_exporter.get_finished_spans()) == 1


async def test_async_context_manager(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    async with await async_client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as stream:
        async for _ in stream:
            pass
    assert len(span_exporter.get_finished_spans()) == 1


async def test_async_cancelled_inside_the_stream_context(
    instrumented, async_client: openai.AsyncOpenAI, server: OpenAIServer, span_exporter: InMemorySpanExporter
):
    server.stream_chunks = 50
    started = asyncio.Event()

    async def consume() -> None:
        stream = await async_client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        async with stream:
            async for _ in stream:
                started.set()
                await asyncio.sleep(10)

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    span = only_span(span_exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})[sc.ERROR_TYPE] == "CancelledError"


async def test_async_cancelled_while_waiting_for_a_chunk(
    instrumented, async_client: openai.AsyncOpenAI, server: OpenAIServer, span_exporter: InMemorySpanExporter
):
    server.delay_next(5)

    async def call() -> None:
        await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)

    task = asyncio.create_task(call())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    span = only_span(span_exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})[sc.ERROR_TYPE] == "CancelledError"


async def test_async_stream_helper(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    async with chat_helpers(async_client).stream(model="gpt-4o-mini", messages=MESSAGES) as stream:
        final = await stream.get_final_completion()
    assert only_span(span_exporter).attributes[sc.GEN_AI_RESPONSE_ID] == final.id  # type: ignore[index]


def test_legacy_completion_stream(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon", stream=True))
    span = only_span(span_exporter)
    attrs = dict(span.attributes or {})
    assert span.name == "text_completion gpt-3.5-turbo-instruct"
    assert attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] == (chunks[-1].choices[0].finish_reason,)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert json_attr(span, sc.GEN_AI_OUTPUT_MESSAGES)[0]["parts"][0]["content"] == text
