"""OpenTelemetry instrumentation for the official ``openai`` client."""

from .instrumentor import OpenAIInstrumentor

__all__ = ["OpenAIInstrumentor"]
