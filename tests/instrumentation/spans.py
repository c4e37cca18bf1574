"""Helpers to read finished spans."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def json_attr(span: ReadableSpan, key: str) -> Any:
    value = (span.attributes or {})[key]
    assert isinstance(value, str)
    return json.loads(value)
