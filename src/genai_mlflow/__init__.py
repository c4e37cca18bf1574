"""genai-mlflow: every LLM call a Python service makes, as OpenTelemetry spans and MLflow runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from genai_mlflow.context import persona, prompt, session, variant
from genai_mlflow.instrumentation.openai import OpenAIInstrumentor

if TYPE_CHECKING:
    from genai_mlflow.exporter.exporter import MlflowSpanExporter
    from genai_mlflow.setup import Handle, instrument

__version__ = "0.1.0"

__all__ = [
    "Handle",
    "MlflowSpanExporter",
    "OpenAIInstrumentor",
    "__version__",
    "instrument",
    "persona",
    "prompt",
    "session",
    "variant",
]

# The exporter side is imported on first use, so that importing the package stays cheap.
_LAZY = {
    "instrument": "genai_mlflow.setup",
    "Handle": "genai_mlflow.setup",
    "MlflowSpanExporter": "genai_mlflow.exporter.exporter",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'genai_mlflow' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
