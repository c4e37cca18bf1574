"""The durable processor: what reaches the spool, and when."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from genai_mlflow import semconv as sc
from genai_mlflow.exporter import processor
from genai_mlflow.exporter.processor import DurableSpanProcessor
from genai_mlflow.exporter.spool import Spool

LLM = {sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_REQUEST_MODEL: "gpt-4o-mini"}


def _records(spool: Spool) -> list[list[str]]:
    """The span names of each record in the spool, in order."""
    assert spool.acquire_drain_lock()
    names = []
    for record in spool.read():
        request = ExportTraceServiceRequest.FromString(record.payload)
        names.append([s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans])
    return names


def _setup(tmp_path: Path, **provider_args) -> tuple[Spool, TracerProvider, list[int]]:
    spool = Spool(tmp_path / "spool")
    woken: list[int] = []
    provider = TracerProvider(**provider_args)
    provider.add_span_processor(DurableSpanProcessor(spool, on_appended=lambda: woken.append(1)))
    return spool, provider, woken


def test_a_standalone_llm_call_is_one_record(tmp_path: Path):
    spool, provider, woken = _setup(tmp_path)
    provider.get_tracer("t").start_span("chat gpt-4o-mini", attributes=LLM).end()
    assert _records(spool) == [["chat gpt-4o-mini"]]
    assert woken == [1]


def test_llm_spans_are_spooled_when_they_end_and_the_rest_with_the_root(tmp_path: Path):
    spool, provider, _ = _setup(tmp_path)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("POST /plan"):
        with tracer.start_as_current_span("db.before"):
            pass
        with tracer.start_as_current_span("chat gpt-4o-mini", attributes=LLM):
            pass
        assert _records(spool) == [["db.before", "chat gpt-4o-mini"]]  # safe before the request ends
        spool.release_drain_lock()
        with tracer.start_as_current_span("db.after"):
            pass
    assert _records(spool) == [["db.after", "POST /plan"]]


def test_traces_without_llm_calls_never_reach_the_spool(tmp_path: Path):
    spool, provider, woken = _setup(tmp_path)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("GET /health"), tracer.start_as_current_span("db"):
        pass
    assert _records(spool) == []
    assert woken == []


def test_unsampled_calls_are_not_spooled(tmp_path: Path):
    spool, provider, _ = _setup(tmp_path, sampler=ALWAYS_OFF)
    provider.get_tracer("t").start_span("chat gpt-4o-mini", attributes=LLM).end()
    assert _records(spool) == []


def test_after_shutdown_it_is_inert(tmp_path: Path):
    spool, provider, _ = _setup(tmp_path)
    provider.shutdown()
    provider.get_tracer("t").start_span("chat gpt-4o-mini", attributes=LLM).end()
    assert _records(spool) == []


def test_a_root_that_ends_before_its_llm_span_is_held_until_it_ends(tmp_path: Path):
    # A web handler returns an LLM stream that the framework reads after the handler's span ended,
    # or the span is finished in the background: the trace must still be written whole, once.
    spool, provider, _ = _setup(tmp_path)
    tracer = provider.get_tracer("t")
    root = tracer.start_span("POST /chat")
    with trace.use_span(root):
        first = tracer.start_span("chat gpt-4o-mini", attributes=LLM)
        second = tracer.start_span("chat gpt-4o", attributes=LLM)
    first.end()
    root.end()
    assert _records(spool) == [["chat gpt-4o-mini"]]  # the root waits for the running LLM span
    spool.release_drain_lock()
    second.end()
    assert _records(spool) == [["POST /chat", "chat gpt-4o"]]


def test_a_root_held_for_a_running_llm_span_is_kept_when_evicted_or_shut_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(processor, "MAX_OPEN_TRACES", 1)
    spool, provider, _ = _setup(tmp_path)
    tracer = provider.get_tracer("t")
    root = tracer.start_span("POST /chat")
    with trace.use_span(root):
        tracer.start_span("chat gpt-4o-mini", attributes=LLM)  # never ends
    root.end()
    with tracer.start_as_current_span("GET /other"), tracer.start_as_current_span("db"):
        pass  # a second open trace evicts the first
    assert _records(spool) == [["POST /chat"]]
    spool.release_drain_lock()

    root = tracer.start_span("POST /late")
    with trace.use_span(root):
        tracer.start_span("chat gpt-4o-mini", attributes=LLM)
    root.end()
    provider.shutdown()
    assert _records(spool)[-1] == ["POST /late"]
