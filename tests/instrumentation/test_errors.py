"""API errors end the span with ERROR and re-raise what the client raised; our bugs never surface."""

from __future__ import annotations

import socket

import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from genai_mlflow import semconv as sc
from genai_mlflow.instrumentation.openai import wrappers
from genai_mlflow.testing.openai_server import OpenAIServer

from .spans import only_span

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_status_errors(
    instrumented,
    client: openai.OpenAI,
    server: OpenAIServer,
    span_exporter: InMemorySpanExporter,
    status,
    exc_type,
):
    server.fail_next(status)
    with pytest.raises(exc_type) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert type(raised.value) is exc_type
    assert raised.value.status_code == status
    span = only_span(span_exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})[sc.ERROR_TYPE] == exc_type.__qualname__
    assert span.events[0].name == "exception"


def test_model_not_found(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="does-not-exist", input="x")
    assert only_span(span_exporter).attributes[sc.ERROR_TYPE] == "NotFoundError"  # type: ignore[index]


def test_timeout(instrumented, server: OpenAIServer, span_exporter: InMemorySpanExporter):
    server.delay_next(2)
    client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.2)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert only_span(span_exporter).attributes[sc.ERROR_TYPE] == "APITimeoutError"  # type: ignore[index]


def test_connection_error(instrumented, span_exporter: InMemorySpanExporter):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    span = only_span(span_exporter)
    assert (span.attributes or {})[sc.ERROR_TYPE] == "APIConnectionError"
    assert (span.attributes or {})[sc.SERVER_PORT] == port


async def test_async_error(
    instrumented, async_client: openai.AsyncOpenAI, server: OpenAIServer, span_exporter: InMemorySpanExporter
):
    server.fail_next(500)
    with pytest.raises(openai.InternalServerError):
        await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert only_span(span_exporter).status.status_code is StatusCode.ERROR


def test_a_bug_reading_the_response_is_swallowed(
    instrumented,
    client: openai.OpenAI,
    span_exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    def broken(*args, **kwargs):
        raise RuntimeError("instrumentation bug")

    monkeypatch.setattr(wrappers, "summarise", broken)
    result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert result.choices[0].message.content
    assert len(span_exporter.get_finished_spans()) == 1
    assert "could not read an LLM call's request or response" in caplog.text


def test_a_bug_starting_the_span_is_swallowed(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
):
    def broken(*args, **kwargs):
        raise RuntimeError("instrumentation bug")

    monkeypatch.setattr(wrappers.attrs, "request_attributes", broken)
    result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert result.choices[0].message.content
    assert span_exporter.get_finished_spans() == ()


def test_a_bug_reading_chunks_is_swallowed(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
):
    from genai_mlflow.instrumentation.openai import streams

    def broken(self, chunk):
        raise RuntimeError("instrumentation bug")

    monkeypatch.setattr(streams.ChatAccumulator, "add", broken)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert chunks
    assert len(span_exporter.get_finished_spans()) == 1
