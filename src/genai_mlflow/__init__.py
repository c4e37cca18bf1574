"""genai-mlflow: every LLM call a Python service makes, as OpenTelemetry spans and MLflow runs."""

from genai_mlflow.context import persona, session
from genai_mlflow.instrumentation.openai import OpenAIInstrumentor

__version__ = "0.1.0"

__all__ = ["OpenAIInstrumentor", "__version__", "persona", "session"]
