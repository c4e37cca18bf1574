"""Persona and session scopes, parent spans and threads, content capture policy, metrics."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator, Mapping

import openai
import pytest
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import genai_mlflow
from genai_mlflow import semconv as sc
from genai_mlflow.instrumentation.openai.attributes import (
    TRUNCATION_MARKER,
    ContentPolicy,
    chat_input_content,
)

from .spans import json_attr, only_span

MESSAGES = [{"role": "user", "content": "my card is 4111-1111-1111-1111"}]


def _call(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_persona_context_manager_and_session(
    instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter
):
    with genai_mlflow.persona("viral_creator"), genai_mlflow.session("conv-1", user_id="u-9"):
        _call(client)
    _call(client)
    inside, outside = span_exporter.get_finished_spans()
    assert (inside.attributes or {})[sc.GEN_AI_AGENT_NAME] == "viral_creator"
    assert (inside.attributes or {})[sc.GEN_AI_CONVERSATION_ID] == "conv-1"
    assert (inside.attributes or {})[sc.USER_ID] == "u-9"
    assert sc.GEN_AI_AGENT_NAME not in (outside.attributes or {})
    assert inside.parent is None  # persona() opens no span


def test_persona_decorator(instrumented, client: openai.OpenAI, span_exporter: InMemorySpanExporter):
    @genai_mlflow.persona("sync_writer")
    def write() -> str:
        _call(client)
        return "done"

    assert write() == "done"
    _call(client)
    inside, outside = span_exporter.get_finished_spans()
    assert (inside.attributes or {})[sc.GEN_AI_AGENT_NAME] == "sync_writer"
    assert sc.GEN_AI_AGENT_NAME not in (outside.attributes or {})


async def test_persona_async_scopes(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter: InMemorySpanExporter
):
    @genai_mlflow.persona("async_writer")
    async def write() -> None:
        await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    async def other() -> None:
        async with genai_mlflow.persona("other"):
            await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    await asyncio.gather(write(), other())
    personas = sorted((s.attributes or {})[sc.GEN_AI_AGENT_NAME] for s in span_exporter.get_finished_spans())
    assert personas == ["async_writer", "other"]


def test_nested_personas_innermost_wins(instrumented, client: openai.OpenAI, span_exporter):
    with genai_mlflow.persona("outer"):
        with genai_mlflow.persona("inner"):
            _call(client)
        _call(client)
    assert [(s.attributes or {})[sc.GEN_AI_AGENT_NAME] for s in span_exporter.get_finished_spans()] == [
        "inner",
        "outer",
    ]


def test_persona_from_upstream_baggage(instrumented, client: openai.OpenAI, span_exporter):
    token = context.attach(baggage.set_baggage(sc.GEN_AI_AGENT_NAME, "from_upstream"))
    try:
        _call(client)
    finally:
        context.detach(token)
    assert only_span(span_exporter).attributes[sc.GEN_AI_AGENT_NAME] == "from_upstream"  # type: ignore[index]


def test_persona_rejects_non_strings():
    with pytest.raises(TypeError, match="persona name must be a string"):
        genai_mlflow.persona(42)  # type: ignore[arg-type]


def test_parent_span_and_threads(
    instrumented, client: openai.OpenAI, tracer_provider: TracerProvider, span_exporter: InMemorySpanExporter
):
    tracer = tracer_provider.get_tracer("app")
    errors: list[str] = []

    def worker() -> None:
        with tracer.start_as_current_span("request") as parent:
            _call(client)
            if trace.get_current_span() is not parent:
                errors.append("context leaked in a thread")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    spans = span_exporter.get_finished_spans()
    llm = [s for s in spans if s.name.startswith("chat")]
    parents = {s.context.span_id: s for s in spans if s.name == "request"}  # type: ignore[union-attr]
    assert len(llm) == 4
    for span in llm:
        assert span.parent is not None and span.parent.span_id in parents


async def test_no_context_leak_in_tasks(
    instrumented, async_client: openai.AsyncOpenAI, tracer_provider: TracerProvider
):
    tracer = tracer_provider.get_tracer("app")

    async def task(i: int) -> bool:
        with tracer.start_as_current_span(f"task-{i}") as parent:
            stream = await async_client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True
            )
            async for _ in stream:
                await asyncio.sleep(0)
            return trace.get_current_span() is parent

    assert all(await asyncio.gather(*(task(i) for i in range(5))))
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.parametrize(
    ("value", "captured"),
    [
        ("true", True),
        ("TRUE", True),
        ("span_only", True),
        ("SPAN_AND_EVENT", True),
        ("false", False),
        ("NO_CONTENT", False),
        ("event_only", False),
        ("nonsense", False),
    ],
)
def test_capture_content_from_environment(
    instrument, client: openai.OpenAI, span_exporter, monkeypatch: pytest.MonkeyPatch, value, captured
):
    monkeypatch.setenv(sc.ENV_CAPTURE_CONTENT, value)
    instrument()
    _call(client)
    assert (sc.GEN_AI_INPUT_MESSAGES in (only_span(span_exporter).attributes or {})) is captured


def test_argument_wins_over_environment(instrument, client: openai.OpenAI, span_exporter, monkeypatch):
    monkeypatch.setenv(sc.ENV_CAPTURE_CONTENT, "true")
    instrument(capture_content=False)
    _call(client)
    assert sc.GEN_AI_INPUT_MESSAGES not in (only_span(span_exporter).attributes or {})


def test_redaction_hook(instrument, client: openai.OpenAI, span_exporter):
    instrument(capture_content=True, redact=lambda text: text.replace("4111-1111-1111-1111", "[card]"))
    _call(client)
    messages = json_attr(only_span(span_exporter), sc.GEN_AI_INPUT_MESSAGES)
    assert messages[0]["parts"][0]["content"] == "my card is [card]"


def test_failing_redaction_hook_withholds_content(instrument, client: openai.OpenAI, span_exporter):
    def hook(text: str) -> str:
        raise ValueError("bad hook")

    instrument(capture_content=True, redact=hook)
    result = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert result.choices[0].message.content
    attrs = only_span(span_exporter).attributes or {}
    assert "4111" not in str(attrs[sc.GEN_AI_INPUT_MESSAGES])


def test_size_cap_marks_the_cut(instrument, client: openai.OpenAI, span_exporter):
    instrument(capture_content=True, max_value_bytes=2000)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 10_000}])
    value = (only_span(span_exporter).attributes or {})[sc.GEN_AI_INPUT_MESSAGES]
    assert isinstance(value, str)
    assert len(value.encode()) <= 2000
    total = len(
        json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": "x" * 10_000}]}], separators=(",", ":")
        )
    )
    assert value.endswith(TRUNCATION_MARKER.format(total=total))


def test_metrics(instrumented, client: openai.OpenAI, metric_reader: InMemoryMetricReader):
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    data = metric_reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    duration = metrics[sc.METRIC_OPERATION_DURATION].data.data_points
    assert sum(p.count for p in duration) == 2  # type: ignore[union-attr]
    point = next(iter(duration))
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == sc.DURATION_BUCKETS
    assert point.attributes[sc.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"  # type: ignore[index]
    tokens = metrics[sc.METRIC_TOKEN_USAGE].data.data_points
    assert {p.attributes[sc.GEN_AI_TOKEN_TYPE] for p in tokens} == {"input", "output"}  # type: ignore[index]
    assert tuple(next(iter(tokens)).explicit_bounds) == sc.TOKEN_USAGE_BUCKETS  # type: ignore[union-attr]
    ttfc = metrics[sc.METRIC_TIME_TO_FIRST_CHUNK].data.data_points
    assert sum(p.count for p in ttfc) == 1  # type: ignore[union-attr]


def test_unsampled_calls_still_count_in_metrics(
    instrument, client: openai.OpenAI, metric_reader: InMemoryMetricReader, meter_provider, span_exporter
):
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    unsampled = TracerProvider(sampler=ALWAYS_OFF)
    from genai_mlflow import OpenAIInstrumentor

    OpenAIInstrumentor().instrument(
        tracer_provider=unsampled, meter_provider=meter_provider, capture_content=True
    )
    try:
        _call(client)
    finally:
        OpenAIInstrumentor().uninstrument()
    data = metric_reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}  # type: ignore[union-attr]
    assert sc.METRIC_TOKEN_USAGE in names
    assert span_exporter.get_finished_spans() == ()


class _Message(Mapping[str, object]):
    """A read-only mapping whose class also has attributes named like message keys."""

    role = "attribute, not the key"

    def __init__(self, **items: object) -> None:
        self.content = "attribute, not the key"
        self._items = items

    def __getitem__(self, key: str) -> object:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def test_content_read_from_any_mapping_by_key():
    policy = ContentPolicy(capture=True)
    for _ in range(2):  # the second read goes through the cached type facts
        content = chat_input_content([_Message(role="user", content="hello")], policy)
        assert json.loads(content[sc.GEN_AI_INPUT_MESSAGES]) == [
            {"role": "user", "parts": [{"type": "text", "content": "hello"}]}
        ]
