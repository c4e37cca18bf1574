"""``persona()`` and ``session()``: scopes that label every LLM call made inside them.

Both put their values in OpenTelemetry baggage, which the instrumentation reads when a span starts,
so a persona set here, or upstream in another service, lands on the span. They open no span.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from opentelemetry import baggage, context

from genai_mlflow import semconv as sc

F = TypeVar("F", bound=Callable[..., Any])

# Set by code that must know whether an instrumented LLM call happened inside it (the seed-compatible
# decorator): a one-element list the instrumentation counts calls in.
llm_call_counter: ContextVar[list[int] | None] = ContextVar("genai_mlflow_llm_calls", default=None)


def note_llm_call() -> None:
    counter = llm_call_counter.get()
    if counter is not None:
        counter[0] += 1


class _BaggageScope:
    """A context manager (sync and async) and a decorator (sync and async functions)."""

    def __init__(self, entries: dict[str, str]) -> None:
        self._entries = entries
        # Per task and thread: one scope object may be entered concurrently, e.g. by many tasks.
        self._tokens: ContextVar[tuple[object, ...]] = ContextVar("genai_mlflow_scope_tokens", default=())

    def _attach(self) -> object:
        ctx = context.get_current()
        for key, value in self._entries.items():
            ctx = baggage.set_baggage(key, value, ctx)
        return context.attach(ctx)

    def __enter__(self) -> _BaggageScope:
        token = self._attach()
        self._tokens.set((*self._tokens.get(), token))
        return self

    def __exit__(self, *exc: object) -> None:
        *rest, token = self._tokens.get()
        self._tokens.set(tuple(rest))
        context.detach(token)  # type: ignore[arg-type]

    async def __aenter__(self) -> _BaggageScope:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_scoped(*args: Any, **kwargs: Any) -> Any:
                token = self._attach()
                try:
                    return await func(*args, **kwargs)
                finally:
                    context.detach(token)  # type: ignore[arg-type]

            return async_scoped  # type: ignore[return-value]

        @functools.wraps(func)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            token = self._attach()
            try:
                return func(*args, **kwargs)
            finally:
                context.detach(token)  # type: ignore[arg-type]

        return scoped  # type: ignore[return-value]


def persona(name: str) -> _BaggageScope:
    """Every LLM call inside carries ``gen_ai.agent.name=name``; it also crosses services in baggage."""
    if not isinstance(name, str):
        raise TypeError(f"persona name must be a string, got {type(name).__name__}")
    return _BaggageScope({sc.GEN_AI_AGENT_NAME: name})


def session(session_id: str, user_id: str | None = None) -> _BaggageScope:
    """Every LLM call inside carries ``gen_ai.conversation.id`` (and ``user.id`` if given)."""
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a string, got {type(session_id).__name__}")
    entries = {sc.GEN_AI_CONVERSATION_ID: session_id}
    if user_id is not None:
        entries[sc.USER_ID] = str(user_id)
    return _BaggageScope(entries)
