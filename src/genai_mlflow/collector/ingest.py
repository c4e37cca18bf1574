"""One export request, from its decoded body to a spool record: parse, check each span, translate
older GenAI attributes, keep the spans of GenAI traces (``TraceGate``), and append them to the spool
as one OTLP record, the same format the in-process span processor writes. No HTTP here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

from genai_mlflow.exporter import records

from . import legacy, otlp
from .gate import Admitted, Entry, TraceGate
from .metrics import CollectorMetrics

logger = logging.getLogger("genai_mlflow.collector")


@dataclass
class Ingested:
    received: int
    rejected: otlp.Rejections
    written: int = 0  # spans in the spool record (this request's and released held ones)
    held: int = 0  # spans of this request waiting for their trace's GenAI span
    spooled: bool = True  # False: the spool refused the record (full, or an I/O error)
    discarded: dict[str, int] = field(default_factory=dict)


class Ingestor:
    def __init__(self, append: Callable[[bytes], bool], gate: TraceGate, metrics: CollectorMetrics) -> None:
        self._append = append
        self._gate = gate
        self._metrics = metrics

    def ingest(self, body: bytes, fmt: str) -> Ingested:
        """Raises ``otlp.RequestError`` for a body that cannot be read at all."""
        parsed = otlp.parse(body, fmt)
        rejected = parsed.rejected
        request = parsed.request
        changed = bool(rejected.total)
        traces: dict[bytes, list[Entry]] = {}
        genai: set[bytes] = set()
        check_depth = fmt == otlp.PROTOBUF  # the JSON reader checks depth as it converts
        for rs in request.resource_spans:
            resource_head = b""
            for ss in rs.scope_spans:
                scope_head = b""
                for span in ss.spans:
                    problem = otlp.span_problem(span, check_depth=check_depth)
                    if problem is not None:
                        rejected.add(problem)
                        changed = True
                        continue
                    if legacy.translate(span):
                        changed = True
                    if not resource_head:
                        resource_head = _head_of_resource(rs)
                    if not scope_head:
                        scope_head = _head_of_scope(ss)
                    traces.setdefault(span.trace_id, []).append(Entry(resource_head, scope_head, span))
                    if records.is_genai(span):
                        genai.add(span.trace_id)
        admitted = self._gate.admit(traces, genai)
        result = Ingested(parsed.received, rejected, held=admitted.held, discarded=dict(admitted.discarded))
        if admitted.write:
            unchanged = not changed and not admitted.held and not admitted.released
            payload = body if unchanged and fmt == otlp.PROTOBUF else _record(admitted)
            result.spooled = self._append(payload)
            result.written = len(admitted.write)
        self._count(result)
        return result

    def _count(self, result: Ingested) -> None:
        m = self._metrics
        m.spans_received.inc(result.received)
        m.spans_accepted.inc(result.received - result.rejected.total)
        for reason, count in result.rejected.counts.items():
            m.spans_rejected.inc(count, reason)
        for reason, count in result.discarded.items():
            m.spans_discarded.inc(count, reason)
        if not result.spooled:
            m.spans_discarded.inc(result.written, "spool_full")


def _head_of_resource(rs: ResourceSpans) -> bytes:
    head = ResourceSpans(schema_url=rs.schema_url)
    head.resource.CopyFrom(rs.resource)
    return bytes(head.SerializeToString()) or b"\0"  # never empty: empty means "not computed yet"


def _head_of_scope(ss: ScopeSpans) -> bytes:
    head = ScopeSpans(schema_url=ss.schema_url)
    head.scope.CopyFrom(ss.scope)
    return bytes(head.SerializeToString()) or b"\0"


def _record(admitted: Admitted) -> bytes:
    """The spans to write as one ``ExportTraceServiceRequest``, grouped by resource and scope."""
    groups: dict[bytes, dict[bytes, list[Entry]]] = {}
    for entry in admitted.write:
        groups.setdefault(entry.resource, {}).setdefault(entry.scope, []).append(entry)
    request = ExportTraceServiceRequest()
    for resource_head, scopes in groups.items():
        rs = request.resource_spans.add()
        if resource_head != b"\0":
            rs.MergeFromString(resource_head)
        for scope_head, entries in scopes.items():
            ss = rs.scope_spans.add()
            if scope_head != b"\0":
                ss.MergeFromString(scope_head)
            for entry in entries:
                if isinstance(entry.span, bytes):
                    ss.spans.add().MergeFromString(entry.span)
                else:
                    ss.spans.append(entry.span)
    return bytes(request.SerializeToString())
