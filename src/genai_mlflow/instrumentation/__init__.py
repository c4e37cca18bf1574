"""Instrumentations that turn LLM client calls into GenAI spans."""
