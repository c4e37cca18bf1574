"""The durable span processor: every finished span of a GenAI trace goes to the spool at once.

A span is safe once it has ended: GenAI spans are appended the moment they end, as an OTLP record
in the OS's buffers, so a killed process loses nothing. The app's other spans (web requests,
database calls) are held in memory only until their trace's local root ends, and are written then
if the trace made an LLM call, or dropped if it did not: a trace without LLM calls never reaches
MLflow. The writer merges the records of a trace by its id.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from genai_mlflow import semconv as sc
from genai_mlflow.throttle import Throttle

from .spool import Spool

logger = logging.getLogger("genai_mlflow.exporter")

# Bounds on what waits in memory for a local root to end: other spans of traces still open.
MAX_OPEN_TRACES = 10_000
MAX_SPANS_PER_TRACE = 1_000


class _OpenTrace:
    __slots__ = ("genai", "root_ended", "running", "spans")

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.genai = False  # an LLM span of this trace has ended
        self.running = 0  # LLM spans started and not yet ended
        self.root_ended = False


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    return bytes(encode_spans(spans).SerializeToString())


def is_local_root(span: ReadableSpan) -> bool:
    return span.parent is None or span.parent.is_remote


def _is_genai(span: ReadableSpan) -> bool:
    return sc.GEN_AI_OPERATION_NAME in (span.attributes or {})


class DurableSpanProcessor(SpanProcessor):
    """Appends GenAI traces to a spool; ``on_appended`` wakes the writer.

    LLM spans are counted when they start: a local root that ends while one is still running (a
    stream returned to a web framework, a span finished in the background) is held until the last
    one ends, so the trace is written whole and lands as one run."""

    def __init__(self, spool: Spool, on_appended: Callable[[], None] | None = None) -> None:
        self._spool = spool
        self.on_appended = on_appended  # replaced when a forked child gets a writer of its own
        self._open: OrderedDict[int, _OpenTrace] = OrderedDict()
        self._lock = threading.Lock()
        self.dropped_spans = 0
        self._drop_log = Throttle(10.0)
        self._closed = False  # a provider cannot drop a processor: a shut-down one stays inert

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        try:
            context = span.context
            if self._closed or context is None or not context.trace_flags.sampled or not _is_genai(span):
                return
            with self._lock:
                self._open_trace(context.trace_id).running += 1
        except Exception:  # never into the app
            logger.exception("genai-mlflow could not note a starting span")

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._on_end(span)
        except Exception:  # never into the app
            logger.exception("genai-mlflow could not spool a span")

    def _open_trace(self, trace_id: int) -> _OpenTrace:
        # Caller holds the lock.
        open_trace = self._open.get(trace_id)
        if open_trace is None:
            open_trace = self._open[trace_id] = _OpenTrace()
            self._evict_oldest()
        return open_trace

    def _on_end(self, span: ReadableSpan) -> None:
        if self._closed:
            return
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        genai = _is_genai(span)
        root = is_local_root(span)
        trace_id = context.trace_id
        with self._lock:
            if root and trace_id not in self._open:  # a standalone span: its own trace
                batch: list[ReadableSpan] = [span] if genai else []
            else:
                batch = self._add(trace_id, self._open_trace(trace_id), span, genai, root)
        if batch:
            self._append(batch)

    def _add(
        self, trace_id: int, open_trace: _OpenTrace, span: ReadableSpan, genai: bool, root: bool
    ) -> list[ReadableSpan]:
        """What to write now that ``span`` of an open trace has ended. Caller holds the lock."""
        if genai:
            open_trace.genai = True
            open_trace.running = max(0, open_trace.running - 1)
        open_trace.root_ended = open_trace.root_ended or root
        if genai or root or len(open_trace.spans) < MAX_SPANS_PER_TRACE:
            open_trace.spans.append(span)
        else:
            self._count_drop(1)
        if open_trace.root_ended and open_trace.running == 0:  # the trace is whole
            del self._open[trace_id]
            return open_trace.spans if open_trace.genai else []
        if genai and not open_trace.root_ended:  # safe on disk now; the rest follows at the root
            batch, open_trace.spans = open_trace.spans, []
            return batch
        return []

    def _evict_oldest(self) -> None:
        while len(self._open) > MAX_OPEN_TRACES:
            _, evicted = self._open.popitem(last=False)
            if (evicted.genai or evicted.running) and evicted.spans:  # an LLM trace: keep it
                self._append(evicted.spans)
            else:
                self._count_drop(len(evicted.spans))

    def _count_drop(self, count: int) -> None:
        self.dropped_spans += count
        if count and self._drop_log.ready():
            logger.warning(
                "genai-mlflow dropped %d non-LLM spans in all: too many open traces or spans per trace",
                self.dropped_spans,
            )

    def _append(self, spans: Sequence[ReadableSpan]) -> None:
        if self._spool.append(encode(spans)) and self.on_appended is not None:
            self.on_appended()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            leftovers = [t.spans for t in self._open.values() if (t.genai or t.running) and t.spans]
            self._open.clear()
        for spans in leftovers:
            self._append(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every span that can be spooled already is; the writer's flush waits for MLflow
