"""``MlflowSpanExporter``: the pipeline as an OpenTelemetry ``SpanExporter``.

For set-ups that only take an exporter (``--traces_exporter mlflow`` beside another distro, or a
``BatchSpanProcessor`` of the app's own). Spans go through the same durable processor, spool and
writer as under ``instrument()``. Note that the SDK's ``BatchSpanProcessor`` in front of it drops
spans when its queue is full; ``instrument()`` and this package's distro do not use one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from genai_mlflow.config import Settings, is_disabled

logger = logging.getLogger("genai_mlflow.exporter")


class MlflowSpanExporter(SpanExporter):
    """Configured from the environment (``MLFLOW_TRACKING_URI``, ``GENAI_MLFLOW_*``) or arguments."""

    def __init__(self, tracking_uri: str | None = None, **options: Any) -> None:
        from genai_mlflow.setup import get_pipeline

        self._pipeline = None if is_disabled() else get_pipeline(Settings.resolve(tracking_uri, **options))

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._pipeline is None:
            return SpanExportResult.SUCCESS
        for span in spans:
            self._pipeline.processor.on_end(span)  # spools, and never raises
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True if self._pipeline is None else self._pipeline.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        if self._pipeline is not None:
            self._pipeline.shutdown()
