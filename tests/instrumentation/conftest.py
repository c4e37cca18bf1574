"""Fixtures for the instrumentor tests: instrument with in-memory SDKs, real clients on the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from genai_mlflow import OpenAIInstrumentor
from genai_mlflow.instrumentation.openai.finisher import FINISHER
from genai_mlflow.testing.openai_server import OpenAIServer

Instrument = Callable[..., OpenAIInstrumentor]


@pytest.fixture(autouse=True, params=["inline", "background"])
def finishing(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with spans finished on the caller's thread, and on the finisher's
    (as under genai-mlflow's pipeline)."""
    FINISHER.enabled = request.param == "background"
    yield request.param
    assert FINISHER.flush(5)
    FINISHER.enabled = False


class _FinishedSpans(InMemorySpanExporter):
    """What a reader sees once the finisher has caught up with the calls made so far."""

    def get_finished_spans(self) -> tuple[ReadableSpan, ...]:
        assert FINISHER.flush(5)
        return super().get_finished_spans()


class _FinishedMetrics(InMemoryMetricReader):
    def get_metrics_data(self) -> MetricsData | None:
        assert FINISHER.flush(5)
        return super().get_metrics_data()


@pytest.fixture
def span_exporter() -> InMemorySpanExporter:
    return _FinishedSpans()


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    return _FinishedMetrics()


@pytest.fixture
def instrument(
    tracer_provider: TracerProvider, meter_provider: MeterProvider, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Instrument]:
    """Instruments with the test's providers; always uninstrumented afterwards."""
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    instrumentor = OpenAIInstrumentor()

    def _instrument(**kwargs: Any) -> OpenAIInstrumentor:
        instrumentor.instrument(tracer_provider=tracer_provider, meter_provider=meter_provider, **kwargs)
        return instrumentor

    yield _instrument
    instrumentor.uninstrument()


@pytest.fixture
def instrumented(instrument: Instrument) -> OpenAIInstrumentor:
    """Instrumented with content capture on."""
    return instrument(capture_content=True)


@pytest.fixture
def client(server: OpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0) as c:
        yield c


@pytest.fixture
async def async_client(server: OpenAIServer) -> Any:
    c = openai.AsyncOpenAI(base_url=server.base_url, api_key="test-key", max_retries=0)
    yield c
    await c.close()
