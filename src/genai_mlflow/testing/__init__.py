"""Test helpers shipped with genai-mlflow (an OpenAI-compatible local server for tests, demos, benchmarks)."""
