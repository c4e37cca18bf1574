"""Differences between the openai majors the tests run against."""

from __future__ import annotations

from typing import Any


def chat_helpers(client: Any) -> Any:
    """``chat.completions`` with ``parse`` and ``stream``; openai before 1.92 kept them under ``beta``."""
    completions = client.chat.completions
    return completions if hasattr(completions, "parse") else client.beta.chat.completions
