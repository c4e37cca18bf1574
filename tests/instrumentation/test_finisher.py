"""Spans finished off the caller's thread, as under genai-mlflow's pipeline."""

from __future__ import annotations

import os
import threading
import time

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from genai_mlflow import semconv as sc
from genai_mlflow.instrumentation.openai.finisher import FINISHER

from .spans import json_attr, only_span

pytestmark = pytest.mark.parametrize("finishing", ["background"], indirect=True)


class _EndThreads(SpanProcessor):
    def __init__(self) -> None:
        self.threads: list[str] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.threads.append(threading.current_thread().name)


def test_the_span_ends_on_the_finisher_with_the_end_time_the_caller_saw(
    instrumented, client: openai.OpenAI, tracer_provider: TracerProvider, span_exporter
):
    ends = _EndThreads()
    tracer_provider.add_span_processor(ends)
    before = time.time_ns()
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    returned = time.time_ns()
    span = only_span(span_exporter)
    assert ends.threads == ["genai-mlflow-finisher"]
    assert span.start_time is not None and span.end_time is not None
    assert before <= span.start_time < span.end_time <= returned
    assert span.attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] > 0


def test_messages_appended_after_the_call_are_not_captured(
    instrumented, client: openai.OpenAI, span_exporter
):
    messages = [{"role": "user", "content": "Plan a trip"}]
    block = threading.Event()
    FINISHER.submit(lambda: block.wait(5))  # hold the finisher until the agent has moved on
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    messages.append({"role": "user", "content": "Cheaper, please"})
    block.set()
    inputs = json_attr(only_span(span_exporter), sc.GEN_AI_INPUT_MESSAGES)
    assert [m["role"] for m in inputs] == ["user"]
    assert inputs[0]["parts"][0]["content"] == "Plan a trip"


def test_past_the_queue_bound_callers_finish_their_own_spans(
    instrumented,
    client: openai.OpenAI,
    tracer_provider: TracerProvider,
    span_exporter,
    monkeypatch: pytest.MonkeyPatch,
):
    ends = _EndThreads()
    tracer_provider.add_span_processor(ends)
    monkeypatch.setattr(FINISHER, "_max_waiting", 0)
    overflows = FINISHER.inline_overflows
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
    assert ends.threads == [threading.current_thread().name]  # nothing lost, nothing waits
    assert FINISHER.inline_overflows == overflows + 1
    assert only_span(span_exporter).attributes[sc.GEN_AI_RESPONSE_MODEL]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_finishes_its_own_calls_and_not_the_parents(
    instrumented, client: openai.OpenAI, span_exporter
):
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "warm up"}])
    assert FINISHER.flush(5)
    block = threading.Event()
    FINISHER.submit(lambda: block.wait(5))  # the parent has work queued at the fork
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "parent"}])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its spans end on a finisher of its own
        status = 1
        try:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "child"}]
            )
            spans = span_exporter.get_finished_spans()  # flushes the child's finisher
            contents = [json_attr(s, sc.GEN_AI_INPUT_MESSAGES)[0]["parts"][0]["content"] for s in spans]
            os.write(write_end, ",".join(contents).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    seen_by_child = os.read(read_end, 1000).decode()
    os.close(read_end)
    block.set()
    assert status == 0
    assert seen_by_child == "warm up,child"  # the parent's queued call was not finished there
    contents = [
        json_attr(s, sc.GEN_AI_INPUT_MESSAGES)[0]["parts"][0]["content"]
        for s in span_exporter.get_finished_spans()
    ]
    assert contents == ["warm up", "parent"]
