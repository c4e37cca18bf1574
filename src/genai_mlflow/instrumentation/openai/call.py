"""One traced LLM call: its span and metrics, ended exactly once whatever path ends it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from time import perf_counter, time_ns
from typing import Any

from opentelemetry.metrics import Histogram, Meter
from opentelemetry.trace import Span, Status, StatusCode

from genai_mlflow import semconv as sc

from .attributes import Attributes
from .finisher import Finisher

logger = logging.getLogger("genai_mlflow.instrumentation")

# A call's attributes, built when it is finished rather than on the caller's thread.
Result = Callable[[], Attributes]

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
    its context manager and its finaliser may all call it. The caller only notes the end time:
    attributes, metrics and the span's end run on the finisher (inline where it is off)."""

    __slots__ = (
        "_content",
        "_ended",
        "_finisher",
        "_instruments",
        "_lock",
        "attributes",
        "span",
        "start",
        "time_to_first_chunk",
    )

    def __init__(
        self,
        span: Span,
        attributes: Attributes,
        instruments: Instruments,
        finisher: Finisher,
        content: Result | None = None,
    ) -> None:
        self.span = span
        self.attributes = attributes  # what the span was started with, for metric attributes
        self._instruments = instruments
        self._finisher = finisher
        self._content = content  # the request's content attributes, computed when finishing
        self.start = perf_counter()
        self.time_to_first_chunk: float | None = None
        self._ended = False
        self._lock = threading.Lock()

    def first_chunk(self) -> None:
        if self.time_to_first_chunk is None:
            self.time_to_first_chunk = perf_counter() - self.start

    def end(self, result: Result | None = None, error: BaseException | None = None) -> None:
        """End the call; ``result`` gives the response's attributes when called."""
        end_ns = time_ns()
        duration = perf_counter() - self.start
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._finisher.submit(partial(self._finish, result, error, end_ns, duration))

    def _finish(
        self, result: Result | None, error: BaseException | None, end_ns: int, duration: float
    ) -> None:
        span = self.span
        try:
            attributes = self._attributes(result)
            started = self.attributes
            metric_attrs: dict[str, Any] = {k: started[k] for k in _METRIC_KEYS if k in started}
            model = attributes.get(sc.GEN_AI_RESPONSE_MODEL)
            if model is not None:
                metric_attrs[sc.GEN_AI_RESPONSE_MODEL] = model
            if error is not None:
                error_type = type(error).__qualname__
                attributes[sc.ERROR_TYPE] = error_type
                metric_attrs[sc.ERROR_TYPE] = error_type
                span.set_status(Status(StatusCode.ERROR, str(error) or error_type))
                if isinstance(error, Exception):
                    span.record_exception(error, timestamp=end_ns)
            if span.is_recording():
                span.set_attributes(attributes)
        except Exception:  # a bug here must never leave the span open
            logger.exception("genai-mlflow could not finish an LLM span")
            span.end(end_time=end_ns)
            return
        span.end(end_time=end_ns)
        self._record(attributes, metric_attrs, duration)

    def _attributes(self, result: Result | None) -> Attributes:
        attributes: Attributes = {}
        for part in (self._content, result):
            if part is None:
                continue
            try:
                attributes.update(part())
            except Exception:  # what could be read still goes on the span
                logger.exception("genai-mlflow could not read an LLM call's request or response")
        if self.time_to_first_chunk is not None:
            attributes[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = self.time_to_first_chunk
        return attributes

    def _record(self, attributes: Attributes, metric_attrs: dict[str, Any], duration: float) -> None:
        instruments = self._instruments
        instruments.duration.record(duration, metric_attrs)
        for key, token_type in (
            (sc.GEN_AI_USAGE_INPUT_TOKENS, sc.TOKEN_TYPE_INPUT),
            (sc.GEN_AI_USAGE_OUTPUT_TOKENS, sc.TOKEN_TYPE_OUTPUT),
        ):
            tokens = attributes.get(key)
            if isinstance(tokens, int):
                instruments.token_usage.record(tokens, {**metric_attrs, sc.GEN_AI_TOKEN_TYPE: token_type})
        if self.time_to_first_chunk is not None:
            instruments.time_to_first_chunk.record(self.time_to_first_chunk, metric_attrs)
