"""Building OTLP export requests for the collector's tests, as protobuf and as OTLP JSON."""

from __future__ import annotations

import base64
import gzip
import json
import os
import time
from typing import Any

from google.protobuf import json_format  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from genai_mlflow.exporter.records import to_any_value


def kv(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=to_any_value(value))


def llm_span(
    trace_id: bytes | None = None,
    *,
    persona: str | None = None,
    model: str = "gpt-4o-mini",
    input_tokens: int = 12,
    output_tokens: int = 3,
    parent: bytes = b"",
    start_ns: int | None = None,
    duration_ns: int = 300_000_000,
    extra: dict[str, Any] | None = None,
) -> Span:
    """A chat span in the current GenAI conventions (a local root unless ``parent`` is given)."""
    start = start_ns if start_ns is not None else time.time_ns()
    span = Span(
        trace_id=trace_id or os.urandom(16),
        span_id=os.urandom(8),
        parent_span_id=parent,
        name=f"chat {model}",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start,
        end_time_unix_nano=start + duration_ns,
    )
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]),
        "gen_ai.output.messages": json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "hello"}], "finish_reason": "stop"}]
        ),
    }
    if persona is not None:
        attributes["gen_ai.agent.name"] = persona
    attributes.update(extra or {})
    span.attributes.extend(kv(k, v) for k, v in attributes.items())
    return span


def plain_span(
    trace_id: bytes, *, name: str = "GET /", parent: bytes = b"", start_ns: int | None = None
) -> Span:
    """A span without GenAI attributes (a web request, a database call)."""
    start = start_ns if start_ns is not None else time.time_ns()
    span = Span(
        trace_id=trace_id,
        span_id=os.urandom(8),
        parent_span_id=parent,
        name=name,
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=start,
        end_time_unix_nano=start + 1_000_000_000,
    )
    span.attributes.append(kv("http.route", "/"))
    return span


def request_of(*spans: Span, resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.extend(kv(k, v) for k, v in {"service.name": "test", **(resource or {})}.items())
    ss = rs.scope_spans.add()
    ss.scope.name = "tests.collector"
    ss.spans.extend(spans)
    return request


def to_otlp_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """OTLP JSON: protobuf's JSON mapping (camelCase, 64-bit integers as strings) with hex ids."""
    document: dict[str, Any] = json_format.MessageToDict(request)
    for rs in document.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                _hex_ids(span)
                for link in span.get("links", []):
                    _hex_ids(link)
    return document


def _hex_ids(obj: dict[str, Any]) -> None:
    for key in ("traceId", "spanId", "parentSpanId"):
        if obj.get(key):
            obj[key] = base64.b64decode(obj[key]).hex()


def json_body(request: ExportTraceServiceRequest) -> bytes:
    return json.dumps(to_otlp_json(request)).encode()


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


def nested_any_value_bytes(depth: int) -> bytes:
    """An ``AnyValue`` nested ``depth`` arrays deep, encoded by hand: the protobuf library refuses
    to build one deeper than its own limit."""
    value: bytes = AnyValue(string_value="leaf").SerializeToString()
    for _ in range(depth):
        array = b"\x0a" + _varint(len(value)) + value  # ArrayValue.values (1)
        value = b"\x2a" + _varint(len(array)) + array  # AnyValue.array_value (5)
    return value


def request_with_raw_value(value: bytes) -> bytes:
    """A one-span request whose only attribute has the given encoded ``AnyValue``."""
    span = llm_span()
    key = b"deep"
    keyvalue = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value
    attribute = b"\x4a" + _varint(len(keyvalue)) + keyvalue  # Span.attributes (9)
    # Re-encode the span with the attribute appended, then the scope and resource around it.
    span_bytes: bytes = span.SerializeToString() + attribute
    scope = b"\x12" + _varint(len(span_bytes)) + span_bytes  # ScopeSpans.spans (2)
    resource_spans = b"\x12" + _varint(len(scope)) + scope  # ResourceSpans.scope_spans (2)
    return b"\x0a" + _varint(len(resource_spans)) + resource_spans  # ExportTraceServiceRequest (1)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
