"""The OpenTelemetry distro and configurator: ``opentelemetry-instrument python app.py`` sends
every OpenAI call to ``MLFLOW_TRACKING_URI`` with no flag and no code change.

The configurator sets up the SDK as OpenTelemetry's own does, then adds the durable span processor
(rather than an exporter behind a ``BatchSpanProcessor``, which drops spans when its queue is
full). Trace, metric and log exporters default to none, so nothing else is expected to be
installed; any the user names still work beside it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.environment_variables import (
    OTEL_LOGS_EXPORTER,
    OTEL_METRICS_EXPORTER,
    OTEL_TRACES_EXPORTER,
)
from opentelemetry.instrumentation.distro import BaseDistro  # type: ignore[attr-defined]
from opentelemetry.sdk._configuration import _OTelSDKConfigurator
from opentelemetry.sdk.trace import TracerProvider

from genai_mlflow.config import Settings, is_disabled, resolve_capture_content

logger = logging.getLogger("genai_mlflow")

INSTRUMENTOR_NAME = "genai_mlflow_openai"
EXPORTER_NAME = "mlflow"


def _without_mlflow_exporter() -> None:
    """The durable processor replaces ``--traces_exporter mlflow``; keep any other exporter."""
    names = [n.strip() for n in os.environ.get(OTEL_TRACES_EXPORTER, "").split(",") if n.strip()]
    if EXPORTER_NAME in names:
        names.remove(EXPORTER_NAME)
        os.environ[OTEL_TRACES_EXPORTER] = ",".join(names) or "none"


class GenAIMlflowDistro(BaseDistro):  # type: ignore[misc]
    def _configure(self, **kwargs: Any) -> None:
        for variable in (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER, OTEL_LOGS_EXPORTER):
            os.environ.setdefault(variable, "none")

    def load_instrumentor(self, entry_point: Any, **kwargs: Any) -> None:
        if entry_point.name == INSTRUMENTOR_NAME:
            if is_disabled():
                return
            # Prompts and answers are the product's promise: on unless the user says otherwise.
            kwargs.setdefault("capture_content", resolve_capture_content(None, default=True))
        super().load_instrumentor(entry_point, **kwargs)


class GenAIMlflowConfigurator(_OTelSDKConfigurator):
    def _configure(self, **kwargs: Any) -> None:
        if is_disabled():
            return
        _without_mlflow_exporter()
        super()._configure(**kwargs)
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            logger.warning("genai-mlflow: no SDK tracer provider after configuration; nothing is exported")
            return
        try:
            from genai_mlflow.setup import attach, get_pipeline

            attach(get_pipeline(Settings.resolve()), provider)
        except Exception:  # a wrong setting must not stop the app from starting
            logger.exception("genai-mlflow could not start; the app runs without it")
