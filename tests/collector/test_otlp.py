"""Reading and checking OTLP export requests (``genai_mlflow.collector.otlp``): no I/O."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from genai_mlflow.collector import otlp
from genai_mlflow.exporter.records import span_attributes
from tests.collector.otlp_data import (
    json_body,
    llm_span,
    nested_any_value_bytes,
    request_of,
    request_with_raw_value,
    to_otlp_json,
)

MIB = 1 << 20


# --- content type and encoding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("application/x-protobuf", otlp.PROTOBUF),
        ("Application/X-Protobuf; charset=binary", otlp.PROTOBUF),
        ("application/json", otlp.JSON),
        ("application/json; charset=utf-8", otlp.JSON),
    ],
)
def test_request_format(header, expected):
    assert otlp.request_format(header) == expected


@pytest.mark.parametrize("header", [None, "", "text/plain", "application/grpc", "application/xml"])
def test_other_content_types_are_415(header):
    with pytest.raises(otlp.RequestError) as caught:
        otlp.request_format(header)
    assert caught.value.status == 415
    assert "application/x-protobuf" in caught.value.message


def test_gzip_deflate_and_identity_bodies_decode():
    data = request_of(llm_span()).SerializeToString()
    assert otlp.decode_body(data, None, MIB) == data
    assert otlp.decode_body(gzip.compress(data), "gzip", MIB) == data
    assert otlp.decode_body(zlib.compress(data), "deflate", MIB) == data
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert otlp.decode_body(raw.compress(data) + raw.flush(), "deflate", MIB) == data


def test_a_gzip_bomb_is_413_without_inflating_it():
    bomb = gzip.compress(bytes(200 * MIB))  # about 200 KB on the wire
    assert len(bomb) < MIB
    with pytest.raises(otlp.RequestError) as caught:
        otlp.decode_body(bomb, "gzip", 4 * MIB)
    assert caught.value.status == 413
    assert "decompressed" in caught.value.message


def test_a_body_over_the_limit_is_413():
    with pytest.raises(otlp.RequestError) as caught:
        otlp.decode_body(bytes(2 * MIB), None, MIB)
    assert caught.value.status == 413


@pytest.mark.parametrize("body", [b"not gzip at all", gzip.compress(b"x" * 1000)[:-12]])
def test_corrupt_or_truncated_gzip_is_400(body):
    with pytest.raises(otlp.RequestError) as caught:
        otlp.decode_body(body, "gzip", MIB)
    assert caught.value.status == 400


def test_unknown_content_encoding_is_415():
    with pytest.raises(otlp.RequestError) as caught:
        otlp.decode_body(b"x", "br", MIB)
    assert caught.value.status == 415


# --- protobuf -----------------------------------------------------------------------------------


def test_protobuf_round_trip():
    request = request_of(llm_span(), llm_span())
    parsed = otlp.parse(request.SerializeToString(), otlp.PROTOBUF)
    assert parsed.request == request
    assert parsed.received == 2
    assert parsed.rejected.total == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(request_of(llm_span()).SerializeToString()[:-7], id="truncated"),
        pytest.param(b"\xff\xfe garbage \x00\x01" * 10, id="garbage"),
        pytest.param(request_with_raw_value(nested_any_value_bytes(200)), id="nested-too-deep"),
    ],
)
def test_unreadable_protobuf_is_400_with_a_reason(body):
    with pytest.raises(otlp.RequestError) as caught:
        otlp.parse(body, otlp.PROTOBUF)
    assert caught.value.status == 400
    assert caught.value.message.startswith("unreadable protobuf: ")
    assert len(caught.value.message) > len("unreadable protobuf: ")


def test_invalid_utf8_in_protobuf_is_400():
    body = (
        request_of(llm_span(extra={"marker": "XMARKERX"}))
        .SerializeToString()
        .replace(b"XMARKERX", b"X\xffMARKER")
    )
    with pytest.raises(otlp.RequestError) as caught:
        otlp.parse(body, otlp.PROTOBUF)
    assert caught.value.status == 400
    assert "UTF-8" in caught.value.message


# --- OTLP JSON ------------------------------------------------------------------------------------


def test_otlp_json_matches_protobuf():
    span = llm_span(parent=os.urandom(8), extra={"list": [1, 2.5, "x", True], "map": {"a": {"b": 1}}})
    span.events.add(name="event", time_unix_nano=span.start_time_unix_nano).attributes.add(
        key="k"
    ).value.int_value = 7
    span.links.add(trace_id=os.urandom(16), span_id=os.urandom(8), flags=1)
    span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="boom"))
    span.flags = 0x300
    request = request_of(span, resource={"gen_ai.agent.name": "p"})
    parsed = otlp.parse(json_body(request), otlp.JSON)
    assert parsed.rejected.total == 0
    assert parsed.request == request


def test_otlp_json_accepts_snake_case_names_string_integers_and_enum_names():
    trace_id, span_id = os.urandom(16), os.urandom(8)
    document = {
        "resource_spans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"string_value": "svc"}}]},
                "scope_spans": [
                    {
                        "spans": [
                            {
                                "trace_id": trace_id.hex(),
                                "span_id": span_id.hex(),
                                "name": "chat m",
                                "kind": "SPAN_KIND_CLIENT",
                                "start_time_unix_nano": "1700000000000000000",
                                "end_time_unix_nano": 1700000000500000000,
                                "attributes": [
                                    {"key": "n", "value": {"int_value": "9007199254740993"}},
                                    {"key": "d", "value": {"doubleValue": "NaN"}},
                                    {"key": "b", "value": {"bytesValue": "AAE="}},
                                    {"key": "empty", "value": {}},
                                ],
                                "status": {"code": "STATUS_CODE_OK"},
                            }
                        ]
                    }
                ],
            }
        ]
    }
    parsed = otlp.parse(json.dumps(document).encode(), otlp.JSON)
    (span,) = parsed.request.resource_spans[0].scope_spans[0].spans
    assert span.trace_id == trace_id and span.span_id == span_id
    assert span.kind == Span.SPAN_KIND_CLIENT
    assert span.end_time_unix_nano == 1700000000500000000
    attrs = span_attributes(span)
    assert attrs["n"] == 9007199254740993  # exact: not through a float
    assert attrs["d"] != attrs["d"]  # NaN
    assert attrs["b"] == b"\x00\x01"
    assert attrs["empty"] is None
    assert span.status.code == Status.STATUS_CODE_OK


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"resourceSpans": [', id="truncated"),
        pytest.param(b"not json", id="garbage"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"resourceSpans": {"a": 1}}', id="wrong-shape"),
        pytest.param(b'{"resourceSpans": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", id="nested-too-deep"),
    ],
)
def test_unreadable_json_is_400_with_a_reason(body):
    with pytest.raises(otlp.RequestError) as caught:
        otlp.parse(body, otlp.JSON)
    assert caught.value.status == 400
    assert "JSON" in caught.value.message


def _document_with(*spans: dict) -> bytes:
    good = to_otlp_json(request_of(llm_span()))
    good["resourceSpans"][0]["scopeSpans"][0]["spans"].extend(spans)
    return json.dumps(good).encode()


def _span_json(**changes) -> dict:
    span = to_otlp_json(request_of(llm_span()))["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span.update(changes)
    return dict(span)


def _deep_value(depth: int) -> dict:
    value: dict = {"stringValue": "leaf"}
    for _ in range(depth):
        value = {"arrayValue": {"values": [value]}}
    return value


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (_span_json(traceId="zz" * 16), "invalid_trace_id"),
        (_span_json(spanId=12345), "invalid_span_id"),
        (_span_json(kind="SPAN_KIND_NOPE"), "malformed"),
        (_span_json(startTimeUnixNano="soon"), "malformed"),
        (_span_json(attributes="not a list"), "malformed"),
        (
            _span_json(attributes=[{"key": "deep", "value": _deep_value(otlp.MAX_VALUE_DEPTH + 1)}]),
            "too_deep",
        ),
        (_span_json(name="\ud800"), "invalid_utf8"),
    ],
)
def test_a_json_span_that_cannot_be_converted_is_rejected_alone(bad, reason):
    parsed = otlp.parse(_document_with(bad), otlp.JSON)
    assert parsed.received == 2
    assert parsed.rejected.counts == {reason: 1}
    assert otlp.count_spans(parsed.request) == 1


def test_invalid_utf8_bytes_in_json_reject_only_their_span():
    body = _document_with(_span_json(name="XMARKERX")).replace(b"XMARKERX", b"X\xff\xfeX")
    parsed = otlp.parse(body, otlp.JSON)
    assert parsed.rejected.counts == {"invalid_utf8": 1}
    assert otlp.count_spans(parsed.request) == 1


def test_a_bad_resource_rejects_its_spans():
    document = to_otlp_json(request_of(llm_span(), llm_span()))
    document["resourceSpans"][0]["resource"]["attributes"] = [{"key": "k", "value": {"boolValue": "yes"}}]
    document["resourceSpans"].append(to_otlp_json(request_of(llm_span()))["resourceSpans"][0])
    parsed = otlp.parse(json.dumps(document).encode(), otlp.JSON)
    assert parsed.received == 3
    assert parsed.rejected.counts == {"malformed": 2}
    assert otlp.count_spans(parsed.request) == 1


def test_json_depth_within_the_limit_is_kept():
    span = _span_json(attributes=[{"key": "deep", "value": _deep_value(otlp.MAX_VALUE_DEPTH - 1)}])
    parsed = otlp.parse(_document_with(span), otlp.JSON)
    assert parsed.rejected.total == 0


# --- per-span checks ------------------------------------------------------------------------------


def _with(**fields) -> Span:
    span = llm_span()
    for name, value in fields.items():
        setattr(span, name, value)
    return span


@pytest.mark.parametrize(
    ("span", "reason"),
    [
        (_with(trace_id=b""), "invalid_trace_id"),
        (_with(trace_id=bytes(16)), "invalid_trace_id"),
        (_with(trace_id=b"\x01" * 8), "invalid_trace_id"),
        (_with(span_id=b""), "invalid_span_id"),
        (_with(span_id=bytes(8)), "invalid_span_id"),
        (_with(parent_span_id=b"\x01\x02"), "invalid_parent_span_id"),
        (_with(start_time_unix_nano=0), "missing_timestamps"),
        (_with(end_time_unix_nano=0), "missing_timestamps"),
        (_with(start_time_unix_nano=2_000, end_time_unix_nano=1_000), "end_before_start"),
        (llm_span(extra={"deep": [[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]}), "too_deep"),
        (llm_span(), None),
        (_with(start_time_unix_nano=5, end_time_unix_nano=5), None),
        (llm_span(extra={"nested": [[["fine"]]]}), None),
    ],
)
def test_span_problem(span, reason):
    assert otlp.span_problem(span) == reason


# --- answers --------------------------------------------------------------------------------------


def test_a_full_success_is_an_empty_response():
    assert otlp.export_response(otlp.PROTOBUF, 0, "") == b""
    assert json.loads(otlp.export_response(otlp.JSON, 0, "")) == {}


def test_partial_success_in_both_encodings():
    rejections = otlp.Rejections()
    rejections.add("end_before_start", 2)
    rejections.add("invalid_trace_id")
    message = rejections.message()
    assert message.startswith("3 span(s) rejected: 2 end_before_start")
    response = ExportTraceServiceResponse.FromString(otlp.export_response(otlp.PROTOBUF, 3, message))
    assert response.partial_success.rejected_spans == 3
    assert response.partial_success.error_message == message
    document = json.loads(otlp.export_response(otlp.JSON, 3, message))
    assert document == {"partialSuccess": {"rejectedSpans": "3", "errorMessage": message}}


def test_error_bodies_are_rpc_status_in_the_request_encoding():
    content_type, body = otlp.error_response(otlp.JSON, 400, "bad")
    assert content_type == otlp.JSON and json.loads(body) == {"code": 3, "message": "bad"}
    content_type, body = otlp.error_response(otlp.PROTOBUF, 413, "too big é")
    assert content_type == otlp.PROTOBUF
    assert body == b"\x08\x08\x12\x0atoo big \xc3\xa9"
    content_type, body = otlp.error_response(None, 415, "use protobuf")
    assert content_type.startswith("text/plain") and body == b"use protobuf\n"


def test_an_empty_body_is_an_empty_request():
    assert otlp.parse(b"", otlp.PROTOBUF).request == ExportTraceServiceRequest()
    assert otlp.parse(b"{}", otlp.JSON).received == 0
