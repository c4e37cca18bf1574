"""One traced LLM call: its span and metrics, ended exactly once whatever path ends it."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from opentelemetry.metrics import Histogram, Meter
from opentelemetry.trace import Span, Status, StatusCode

from genai_mlflow import semconv as sc

from .attributes import Attributes

logger = logging.getLogger("genai_mlflow.instrumentation")

# Attributes copied from the span onto every metric point: low-cardinality ones only.
_METRIC_KEYS = (
    sc.GEN_AI_OPERATION_NAME,
    sc.GEN_AI_PROVIDER_NAME,
    sc.GEN_AI_REQUEST_MODEL,
    sc.SERVER_ADDRESS,
    sc.SERVER_PORT,
)


@dataclass(frozen=True)
class Instruments:
    duration: Histogram
    token_usage: Histogram
    time_to_first_chunk: Histogram

    @classmethod
    def create(cls, meter: Meter) -> Instruments:
        return cls(
            duration=meter.create_histogram(
                sc.METRIC_OPERATION_DURATION,
                unit="s",
                description="GenAI operation duration",
                explicit_bucket_boundaries_advisory=list(sc.DURATION_BUCKETS),
            ),
            token_usage=meter.create_histogram(
                sc.METRIC_TOKEN_USAGE,
                unit="{token}",
                description="Number of input and output tokens used",
                explicit_bucket_boundaries_advisory=list(sc.TOKEN_USAGE_BUCKETS),
            ),
            time_to_first_chunk=meter.create_histogram(
                sc.METRIC_TIME_TO_FIRST_CHUNK,
                unit="s",
                description="Time to receive the first chunk of a streamed response",
                explicit_bucket_boundaries_advisory=list(sc.DURATION_BUCKETS),
            ),
        )


class LLMCall:
    """Owns a started span. ``end`` is idempotent and thread-safe, so the stream, its close,
    its context manager and its finaliser may all call it."""

    __slots__ = ("_ended", "_instruments", "_lock", "attributes", "span", "start", "time_to_first_chunk")

    def __init__(self, span: Span, attributes: Attributes, instruments: Instruments) -> None:
        self.span = span
        self.attributes = attributes  # what the span was started with, for metric attributes
        self._instruments = instruments
        self.start = perf_counter()
        self.time_to_first_chunk: float | None = None
        self._ended = False
        self._lock = threading.Lock()

    def first_chunk(self) -> None:
        if self.time_to_first_chunk is None:
            self.time_to_first_chunk = perf_counter() - self.start

    def end(self, result: Attributes | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        try:
            self._finish(result or {}, error)
        except Exception:  # a bug here must never reach the caller
            logger.exception("genai-mlflow could not finish an LLM span")
            self.span.end()

    def _finish(self, result: Attributes, error: BaseException | None) -> None:
        duration = perf_counter() - self.start
        span = self.span
        if self.time_to_first_chunk is not None:
            result[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = self.time_to_first_chunk
        metric_attrs: dict[str, Any] = {k: self.attributes[k] for k in _METRIC_KEYS if k in self.attributes}
        model = result.get(sc.GEN_AI_RESPONSE_MODEL)
        if model is not None:
            metric_attrs[sc.GEN_AI_RESPONSE_MODEL] = model
        if error is not None:
            error_type = type(error).__qualname__
            result[sc.ERROR_TYPE] = error_type
            metric_attrs[sc.ERROR_TYPE] = error_type
            span.set_status(Status(StatusCode.ERROR, str(error) or error_type))
            if isinstance(error, Exception):
                span.record_exception(error)
        if span.is_recording():
            span.set_attributes(result)
        span.end()

        instruments = self._instruments
        instruments.duration.record(duration, metric_attrs)
        for key, token_type in (
            (sc.GEN_AI_USAGE_INPUT_TOKENS, sc.TOKEN_TYPE_INPUT),
            (sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.TOKEN_TYPE_OUTPUT),
        ):
            tokens = result.get(key)
            if isinstance(tokens, int):
                instruments.token_usage.record(tokens, {**metric_attrs, sc.GEN_AI_TOKEN_TYPE: token_type})
        if self.time_to_first_chunk is not None:
            instruments.time_to_first_chunk.record(self.time_to_first_chunk, metric_attrs)
