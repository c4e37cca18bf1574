"""OTLP/HTTP trace requests, read and checked with no I/O.

- ``request_format``: ``application/x-protobuf`` or ``application/json``, else a 415.
- ``decode_body``: ``Content-Encoding`` identity, gzip or deflate, decompressed in bounded steps so
  that a small body cannot expand past ``max_bytes`` (a gzip bomb is a 413, not an out-of-memory).
- ``parse``: the body as an ``ExportTraceServiceRequest``. OTLP JSON as the specification has it:
  hex trace and span ids, lowerCamelCase or the proto's snake_case field names, 64-bit integers as
  numbers or strings, enums as numbers or names. A request that cannot be read at all is a
  ``RequestError`` (400); a span that cannot be converted (a bad id, invalid UTF-8, a wrong type,
  values nested too deeply) is left out and counted in ``Parsed.rejected``.
- ``span_problem``: what is wrong with a span that MLflow would refuse or misfile: ids of the
  wrong length or all zero, no timestamps, an end before its start, values nested too deeply.
- ``export_response`` / ``error_response``: the answers, in the request's own encoding.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
MAX_VALUE_DEPTH: Final = 16  # nesting of arrays and key-value lists inside one attribute value
_READ_STEP = 64 * 1024
_U64 = 1 << 64
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_U32 = 1 << 32

# Why a span was left out; the keys are the `reason` label of the rejected-spans metric.
REASONS: Final = {
    "invalid_trace_id": "trace id missing, not 16 bytes, or all zero",
    "invalid_span_id": "span id missing, not 8 bytes, or all zero",
    "invalid_parent_span_id": "parent span id not 8 bytes",
    "missing_timestamps": "start or end time missing",
    "end_before_start": "end time before start time",
    "too_deep": f"attribute values nested deeper than {MAX_VALUE_DEPTH} levels",
    "invalid_utf8": "a string is not valid UTF-8",
    "malformed": "a field has the wrong type or an out-of-range value",
}

# google.rpc.Code values for the Status body of error answers.
_RPC_CODES: Final = {400: 3, 401: 16, 404: 5, 405: 12, 408: 4, 411: 3, 413: 8, 415: 3, 429: 8, 503: 14}


class RequestError(Exception):
    """The request cannot be read at all: answered with ``status`` and this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Rejections:
    """Spans left out of a request, by reason."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str, count: int = 1) -> None:
        if count:
            self.counts[reason] += count

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def message(self) -> str:
        """For OTLP's ``partial_success.error_message``: what was wrong, most frequent first."""
        if not self.counts:
            return ""
        parts = [f"{n} {reason} ({REASONS.get(reason, reason)})" for reason, n in self.counts.most_common()]
        return f"{self.total} span(s) rejected: " + "; ".join(parts)


@dataclass
class Parsed:
    request: ExportTraceServiceRequest
    received: int  # spans in the body, readable or not
    rejected: Rejections  # spans the body had that could not be converted (JSON only)


# ---------------------------------------------------------------------------------------------
# Content type and encoding


def request_format(content_type: str | None) -> str:
    """``PROTOBUF`` or ``JSON`` from a Content-Type header (parameters such as charset ignored)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in (PROTOBUF, "application/protobuf"):
        return PROTOBUF
    if media == JSON:
        return JSON
    shown = media or "none"
    raise RequestError(415, f"unsupported content type {shown}: use {PROTOBUF} or {JSON}")


def decode_body(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """The body with its Content-Encoding undone, at most ``max_bytes`` long once decoded."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        if len(body) > max_bytes:
            raise RequestError(413, f"body of {len(body)} bytes is over the limit of {max_bytes}")
        return body
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        wbits = zlib.MAX_WBITS  # zlib-wrapped, as HTTP's deflate is; raw deflate is tried below
    else:
        raise RequestError(415, f"unsupported content encoding {encoding}: use gzip, deflate or none")
    try:
        return _inflate(body, wbits, max_bytes)
    except zlib.error as exc:
        if encoding == "deflate":
            try:
                return _inflate(body, -zlib.MAX_WBITS, max_bytes)
            except zlib.error:
                pass
        raise RequestError(400, f"body is not valid {encoding}: {exc}") from None


def _inflate(body: bytes, wbits: int, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out: list[bytes] = []
    size = 0
    data = body
    while True:
        # At most one step past the limit is ever held: the bomb never expands in memory.
        chunk = inflater.decompress(data, _READ_STEP)
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"decompressed body is over the limit of {max_bytes} bytes")
        out.append(chunk)
        data = inflater.unconsumed_tail
        if inflater.eof:
            break
        if not data and not chunk:
            raise zlib.error("truncated stream")
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# Parsing


def parse(body: bytes, fmt: str) -> Parsed:
    """The request in ``body`` (already decoded), protobuf or OTLP JSON."""
    if fmt == PROTOBUF:
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            raise RequestError(400, f"unreadable protobuf: {_decode_error_text(exc)}") from None
        return Parsed(request, count_spans(request), Rejections())
    return _parse_json(body)


def count_spans(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def _decode_error_text(exc: DecodeError) -> str:
    text = str(exc)
    # upb says "Error parsing message with type '...': <what>"; the what is the useful part.
    return text.rsplit("': ", 1)[-1] if "': " in text else text or "not an ExportTraceServiceRequest"


class _Invalid(Exception):
    """A span (or a resource or scope, and so its spans) that cannot be converted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse_json(body: bytes) -> Parsed:
    # Invalid UTF-8 bytes become lone surrogates (surrogateescape): a span holding one is rejected
    # when its string is set on the protobuf, and the rest of the request is still read.
    try:
        text = body.decode("utf-8", errors="surrogateescape")
        document = json.loads(text)
    except RecursionError:
        raise RequestError(400, "invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise RequestError(400, f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RequestError(400, "invalid OTLP JSON: the body is not an object")
    resource_spans = _field(document, "resourceSpans", "resource_spans")
    if resource_spans is None:
        resource_spans = []
    if not isinstance(resource_spans, list):
        raise RequestError(400, "invalid OTLP JSON: resourceSpans is not a list")
    request = ExportTraceServiceRequest()
    rejected = Rejections()
    received = 0
    for rs_json in resource_spans:
        if not isinstance(rs_json, dict):
            raise RequestError(400, "invalid OTLP JSON: an item of resourceSpans is not an object")
        scope_spans = _field(rs_json, "scopeSpans", "scope_spans") or []
        if not isinstance(scope_spans, list):
            raise RequestError(400, "invalid OTLP JSON: scopeSpans is not a list")
        spans_in = [_spans_of(ss) for ss in scope_spans]
        count = sum(len(spans) for spans in spans_in)
        received += count
        rs = request.resource_spans.add()
        try:
            _fill_resource(rs.resource, _field(rs_json, "resource") or {})
            rs.schema_url = _string(_field(rs_json, "schemaUrl", "schema_url") or "")
        except _Invalid as exc:
            rejected.add(exc.reason, count)
            del request.resource_spans[-1]
            continue
        for ss_json, spans in zip(scope_spans, spans_in, strict=True):
            ss = rs.scope_spans.add()
            try:
                _fill_scope(ss.scope, _field(ss_json, "scope") or {})
                ss.schema_url = _string(_field(ss_json, "schemaUrl", "schema_url") or "")
            except _Invalid as exc:
                rejected.add(exc.reason, len(spans))
                del rs.scope_spans[-1]
                continue
            for span_json in spans:
                span = ss.spans.add()
                try:
                    _fill_span(span, span_json)
                except _Invalid as exc:
                    rejected.add(exc.reason)
                    del ss.spans[-1]
    return Parsed(request, received, rejected)


def _spans_of(scope_spans: Any) -> list[Any]:
    if not isinstance(scope_spans, dict):
        raise RequestError(400, "invalid OTLP JSON: an item of scopeSpans is not an object")
    spans = _field(scope_spans, "spans") or []
    if not isinstance(spans, list):
        raise RequestError(400, "invalid OTLP JSON: spans is not a list")
    return spans


def _field(obj: Mapping[str, Any], camel: str, snake: str | None = None) -> Any:
    value = obj.get(camel)
    if value is None and snake is not None:
        value = obj.get(snake)
    return value


def _guarded(fill: Any) -> Any:
    """Turns the errors protobuf raises on bad values into the reason a span is rejected for."""

    def run(target: Any, obj: Any, *args: Any) -> None:
        try:
            fill(target, obj, *args)
        except _Invalid:
            raise
        except UnicodeError:
            raise _Invalid("invalid_utf8") from None
        except (ValueError, TypeError, OverflowError, AttributeError):
            raise _Invalid("malformed") from None

    return run


@_guarded
def _fill_resource(resource: Resource, obj: Any) -> None:
    _require_dict(obj)
    _fill_attributes(resource.attributes, _field(obj, "attributes"))
    resource.dropped_attributes_count = _uint32(
        _field(obj, "droppedAttributesCount", "dropped_attributes_count")
    )


@_guarded
def _fill_scope(scope: InstrumentationScope, obj: Any) -> None:
    _require_dict(obj)
    scope.name = _string(_field(obj, "name") or "")
    scope.version = _string(_field(obj, "version") or "")
    _fill_attributes(scope.attributes, _field(obj, "attributes"))
    scope.dropped_attributes_count = _uint32(
        _field(obj, "droppedAttributesCount", "dropped_attributes_count")
    )


@_guarded
def _fill_span(span: Span, obj: Any) -> None:
    _require_dict(obj)
    span.trace_id = _id(_field(obj, "traceId", "trace_id"), 16, "invalid_trace_id")
    span.span_id = _id(_field(obj, "spanId", "span_id"), 8, "invalid_span_id")
    span.parent_span_id = _id(_field(obj, "parentSpanId", "parent_span_id"), 8, "invalid_parent_span_id")
    span.trace_state = _string(_field(obj, "traceState", "trace_state") or "")
    span.flags = _uint32(_field(obj, "flags"))
    span.name = _string(_field(obj, "name") or "")
    span.kind = _enum(_field(obj, "kind"), Span.SpanKind)  # type: ignore[assignment]
    span.start_time_unix_nano = _uint64(_field(obj, "startTimeUnixNano", "start_time_unix_nano"))
    span.end_time_unix_nano = _uint64(_field(obj, "endTimeUnixNano", "end_time_unix_nano"))
    _fill_attributes(span.attributes, _field(obj, "attributes"))
    span.dropped_attributes_count = _uint32(_field(obj, "droppedAttributesCount", "dropped_attributes_count"))
    for event_json in _list(_field(obj, "events")):
        _require_dict(event_json)
        event = span.events.add()
        event.time_unix_nano = _uint64(_field(event_json, "timeUnixNano", "time_unix_nano"))
        event.name = _string(_field(event_json, "name") or "")
        _fill_attributes(event.attributes, _field(event_json, "attributes"))
        event.dropped_attributes_count = _uint32(
            _field(event_json, "droppedAttributesCount", "dropped_attributes_count")
        )
    span.dropped_events_count = _uint32(_field(obj, "droppedEventsCount", "dropped_events_count"))
    for link_json in _list(_field(obj, "links")):
        _require_dict(link_json)
        link = span.links.add()
        link.trace_id = _id(_field(link_json, "traceId", "trace_id"), 16, "malformed")
        link.span_id = _id(_field(link_json, "spanId", "span_id"), 8, "malformed")
        link.trace_state = _string(_field(link_json, "traceState", "trace_state") or "")
        _fill_attributes(link.attributes, _field(link_json, "attributes"))
        link.dropped_attributes_count = _uint32(
            _field(link_json, "droppedAttributesCount", "dropped_attributes_count")
        )
        link.flags = _uint32(_field(link_json, "flags"))
    span.dropped_links_count = _uint32(_field(obj, "droppedLinksCount", "dropped_links_count"))
    status = _field(obj, "status")
    if status is not None:
        _require_dict(status)
        span.status.message = _string(_field(status, "message") or "")
        span.status.code = _enum(_field(status, "code"), Status.StatusCode)  # type: ignore[assignment]


def _require_dict(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise _Invalid("malformed")


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid("malformed")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("malformed")
    return value


def _id(value: Any, size: int, reason: str) -> bytes:
    """OTLP JSON ids are hex; base64 (protobuf's JSON mapping) is accepted too. Lengths are
    checked by ``span_problem``, so that a wrong one is rejected with its own reason."""
    if value is None or value == "":
        return b""
    if not isinstance(value, str):
        raise _Invalid(reason)
    try:
        return bytes.fromhex(value)
    except ValueError:
        pass
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid(reason) from None
    if len(decoded) != size:
        raise _Invalid(reason)
    return decoded


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise _Invalid("malformed")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _Invalid("malformed") from None
    raise _Invalid("malformed")


def _uint64(value: Any) -> int:
    if value is None:
        return 0
    number = _integer(value)
    if not 0 <= number < _U64:
        raise _Invalid("malformed")
    return number


def _uint32(value: Any) -> int:
    if value is None:
        return 0
    number = _integer(value)
    if not 0 <= number < _U32:
        raise _Invalid("malformed")
    return number


def _enum(value: Any, enum: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        try:
            return int(enum.Value(value))
        except ValueError:
            raise _Invalid("malformed") from None
    number = _integer(value)
    if not -(1 << 31) <= number < (1 << 31):
        raise _Invalid("malformed")
    return number


def _fill_attributes(target: Any, value: Any) -> None:
    for item in _list(value):
        _require_dict(item)
        kv: KeyValue = target.add()
        kv.key = _string(item.get("key", ""))
        raw = item.get("value")
        if raw is not None:
            _fill_any(kv.value, raw, 1)


def _fill_any(target: AnyValue, obj: Any, depth: int) -> None:
    if depth > MAX_VALUE_DEPTH:
        raise _Invalid("too_deep")
    _require_dict(obj)
    if not obj:
        return  # an empty AnyValue
    for camel, snake in _VALUE_FIELDS:
        if camel in obj or snake in obj:
            value = obj[camel] if camel in obj else obj[snake]
            break
    else:
        return  # no known field: an empty value, as unknown fields are ignored
    if camel == "stringValue":
        target.string_value = _string(value)
    elif camel == "boolValue":
        if not isinstance(value, bool):
            raise _Invalid("malformed")
        target.bool_value = value
    elif camel == "intValue":
        number = _integer(value)
        if not _I64_MIN <= number <= _I64_MAX:
            raise _Invalid("malformed")
        target.int_value = number
    elif camel == "doubleValue":
        target.double_value = _double(value)
    elif camel == "bytesValue":
        try:
            target.bytes_value = base64.b64decode(_string(value), validate=True)
        except (binascii.Error, ValueError):
            raise _Invalid("malformed") from None
    elif camel == "arrayValue":
        _require_dict(value)
        array = target.array_value
        array.SetInParent()
        for item in _list(value.get("values")):
            _fill_any(array.values.add(), item, depth + 1)
    else:  # kvlistValue
        _require_dict(value)
        kvlist = target.kvlist_value
        kvlist.SetInParent()
        for item in _list(value.get("values")):
            _require_dict(item)
            kv = kvlist.values.add()
            kv.key = _string(item.get("key", ""))
            if item.get("value") is not None:
                _fill_any(kv.value, item["value"], depth + 1)


_VALUE_FIELDS: Final = (
    ("stringValue", "string_value"),
    ("intValue", "int_value"),
    ("doubleValue", "double_value"),
    ("boolValue", "bool_value"),
    ("arrayValue", "array_value"),
    ("kvlistValue", "kvlist_value"),
    ("bytesValue", "bytes_value"),
)
_SPECIAL_DOUBLES: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _double(value: Any) -> float:
    if isinstance(value, bool):
        raise _Invalid("malformed")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        if value in _SPECIAL_DOUBLES:
            return _SPECIAL_DOUBLES[value]
        try:
            return float(value)
        except ValueError:
            raise _Invalid("malformed") from None
    raise _Invalid("malformed")


# ---------------------------------------------------------------------------------------------
# Per-span checks


def span_problem(span: Span, *, check_depth: bool = True) -> str | None:
    """The reason (a key of ``REASONS``) to reject this span, or None if it is fine."""
    trace_id = span.trace_id
    if len(trace_id) != 16 or not any(trace_id):
        return "invalid_trace_id"
    span_id = span.span_id
    if len(span_id) != 8 or not any(span_id):
        return "invalid_span_id"
    if len(span.parent_span_id) not in (0, 8):
        return "invalid_parent_span_id"
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if not start or not end:
        return "missing_timestamps"
    if end < start:
        return "end_before_start"
    if check_depth and not _shallow(span):
        return "too_deep"
    return None


def _shallow(span: Span) -> bool:
    for kv in span.attributes:
        if (
            kv.value.WhichOneof("value") in ("array_value", "kvlist_value")
            and _depth(kv.value) > MAX_VALUE_DEPTH
        ):
            return False
    for event in span.events:
        for kv in event.attributes:
            if _depth(kv.value) > MAX_VALUE_DEPTH:
                return False
    return True


def _depth(value: AnyValue) -> int:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return 1 + max((_depth(v) for v in value.array_value.values), default=0)
    if kind == "kvlist_value":
        return 1 + max((_depth(kv.value) for kv in value.kvlist_value.values), default=0)
    return 1


# ---------------------------------------------------------------------------------------------
# Answers


def export_response(fmt: str, rejected: int, message: str) -> bytes:
    """``ExportTraceServiceResponse``: empty when every span was accepted, else partial_success."""
    if fmt == JSON:
        if not rejected and not message:
            return b"{}"
        partial = {"rejectedSpans": str(rejected), "errorMessage": message}
        return json.dumps({"partialSuccess": partial}).encode()
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.CopyFrom(
            ExportTracePartialSuccess(rejected_spans=rejected, error_message=message)
        )
    return bytes(response.SerializeToString())


def error_response(fmt: str | None, status: int, message: str) -> tuple[str, bytes]:
    """(content type, body) for a failed request: a ``google.rpc.Status`` in the request's
    encoding, as OTLP/HTTP asks, or plain text when the request's encoding is unknown."""
    code = _RPC_CODES.get(status, 2)
    if fmt == JSON:
        return JSON, json.dumps({"code": code, "message": message}).encode()
    if fmt == PROTOBUF:
        return PROTOBUF, _rpc_status(code, message)
    return "text/plain; charset=utf-8", (message + "\n").encode()


def _rpc_status(code: int, message: str) -> bytes:
    """google.rpc.Status {int32 code = 1; string message = 2;}, encoded by hand: its generated
    class lives in googleapis-common-protos, which this package does not otherwise need."""
    text = message.encode("utf-8", errors="replace")
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


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
