"""Patching: uninstrument, double instrument, suppression, raw-response views, other instrumentors."""

from __future__ import annotations

import logging

import openai
import pytest
import wrapt
from openai.resources.chat.completions import AsyncCompletions, Completions
from openai.resources.embeddings import Embeddings
from openai.resources.responses import Responses
from opentelemetry import context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genai_mlflow import OpenAIInstrumentor
from genai_mlflow import semconv as sc

from .spans import only_span

MESSAGES = [{"role": "user", "content": "hi"}]


def test_uninstrument_restores_the_original_methods(instrument):
    originals = {
        (cls, name): cls.__dict__[name]
        for cls in (Completions, AsyncCompletions, Embeddings, Responses)
        for name in ("create", "with_raw_response", "with_streaming_response")
    }
    instrumentor = instrument()
    assert isinstance(Completions.__dict__["create"], wrapt.FunctionWrapper)
    instrumentor.uninstrument()
    for (cls, name), original in originals.items():
        assert cls.__dict__[name] is original


def test_uninstrumented_calls_make_no_spans(
    instrument, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    instrument().uninstrument()
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert span_exporter.get_finished_spans() == ()


def test_instrumenting_twice_does_not_double_wrap(
    instrument, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    instrument()
    instrument()
    OpenAIInstrumentor().instrument()
    assert not isinstance(Completions.__dict__["create"].__wrapped__, wrapt.FunctionWrapper)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(span_exporter.get_finished_spans()) == 1


def test_suppression_key_silences_it(instrument, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    instrument()
    with suppress_instrumentation():
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert span_exporter.get_finished_spans() == ()


def test_raw_response(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_RESPONSE_ID] == completion.id
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == completion.usage.completion_tokens  # type: ignore[union-attr]


def test_raw_response_stream(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert span_exporter.get_finished_spans() == ()
    chunks = list(raw.parse())
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]


def test_streaming_response(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    ) as raw:
        completion = raw.parse()
    assert only_span(span_exporter).attributes[sc.GEN_AI_RESPONSE_ID] == completion.id  # type: ignore[index]


def test_streaming_response_stream(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as raw:
        chunks = list(raw.parse())
    attrs = dict(only_span(span_exporter).attributes or {})
    assert attrs[sc.GEN_AI_RESPONSE_ID] == chunks[0].id


def test_streaming_response_closed_unread(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    with client.chat.completions.with_streaming_response.create(model="gpt-4o-mini", messages=MESSAGES):
        pass
    assert len(span_exporter.get_finished_spans()) == 1


async def test_async_raw_and_streaming_response(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    raw = await async_client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    raw.parse()
    async with async_client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as streamed:
        async for _ in await streamed.parse():
            pass
    assert len(span_exporter.get_finished_spans()) == 2


def test_views_touched_before_instrument_are_traced(
    instrument, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    before_raw = client.chat.completions.with_raw_response
    before_streaming = client.embeddings.with_streaming_response
    assert before_raw is client.chat.completions.with_raw_response
    instrument()
    client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES).parse()
    with client.embeddings.with_streaming_response.create(model="text-embedding-3-small", input="x") as r:
        r.parse()
    assert [s.name for s in span_exporter.get_finished_spans()] == [
        "chat gpt-4o-mini",
        "embeddings text-embedding-3-small",
    ]
    del before_streaming


def test_views_touched_while_instrumented_stop_tracing(
    instrument, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    instrument()
    client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES).parse()
    assert len(span_exporter.get_finished_spans()) == 1
    OpenAIInstrumentor().uninstrument()
    client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES).parse()
    assert len(span_exporter.get_finished_spans()) == 1


def test_warns_once_when_another_instrumentation_is_active(
    instrument, client: openai.OpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    def other(wrapped, instance, args, kwargs):
        return wrapped(*args, **kwargs)

    monkeypatch.setattr(OpenAIInstrumentor, "_warned_other", False)
    wrapt.wrap_function_wrapper(Completions, "create", other)
    try:
        with caplog.at_level(logging.WARNING, logger="genai_mlflow"):
            instrument().uninstrument()
            instrument()
        warnings = [r for r in caplog.records if "Another OpenAI instrumentation" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        OpenAIInstrumentor().uninstrument()
        Completions.create = Completions.__dict__["create"].__wrapped__  # type: ignore[method-assign]


def test_no_context_leak_after_the_call(instrumented, client: openai.OpenAI):
    before = context.get_current()
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert context.get_current() == before
    list(stream)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert context.get_current() == before
