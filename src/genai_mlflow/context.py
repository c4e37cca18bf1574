"""Scopes that label every LLM call made inside them: ``persona()``, ``session()``, ``prompt()``
and ``variant()``.

They put their values in OpenTelemetry baggage, which the instrumentation reads when a span starts,
so a label set here, or upstream in another service, lands on the span. They open no span.

Prompts the app loads from MLflow's Prompt Registry are noted too (see ``note_prompt_loaded``): a
load counts for the calls made after it in the same thread or task, until the innermost scope
around the load ends, or, outside every scope, within the same trace.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import baggage, context, trace

from genai_mlflow import semconv as sc
from genai_mlflow.assignment import assign, validate

F = TypeVar("F", bound=Callable[..., Any])

# Set by code that must know whether an instrumented LLM call happened inside it (the seed-compatible
# decorator): a one-element list the instrumentation counts calls in.
llm_call_counter: ContextVar[list[int] | None] = ContextVar("genai_mlflow_llm_calls", default=None)


def note_llm_call() -> None:
    counter = llm_call_counter.get()
    if counter is not None:
        counter[0] += 1


@dataclass(frozen=True)
class LoadedPrompts:
    """Prompts loaded from the registry that count for the calls made after the load: within the
    innermost scope they were loaded in, or, loaded outside every scope, within ``trace_id``."""

    refs: tuple[str, ...] = ()  # "name/version"
    in_scope: bool = False
    trace_id: int = 0


_NO_LOADS = LoadedPrompts()
_loaded_prompts: ContextVar[LoadedPrompts] = ContextVar("genai_mlflow_loaded_prompts", default=_NO_LOADS)


def note_prompt_loaded(name: str, version: object) -> None:
    """Record that the app loaded a prompt version, for the calls that follow it."""
    ref = f"{name}/{version}"
    current = _loaded_prompts.get()
    if not current.in_scope:
        span_context = trace.get_current_span().get_span_context()
        if not span_context.is_valid:
            return  # outside every scope and trace: no call to attribute it to
        if current.trace_id != span_context.trace_id:
            current = LoadedPrompts(trace_id=span_context.trace_id)  # an earlier trace's loads are gone
    if ref not in current.refs:
        _loaded_prompts.set(LoadedPrompts((*current.refs, ref), current.in_scope, current.trace_id))


def current_loaded_prompts() -> tuple[str, ...]:
    """The loads that count for a call starting now, as "name/version"."""
    current = _loaded_prompts.get()
    if not current.refs:
        return ()
    if not current.in_scope and current.trace_id != trace.get_current_span().get_span_context().trace_id:
        return ()
    return current.refs


class _BaggageScope:
    """A context manager (sync and async) and a decorator (sync and async functions)."""

    def __init__(self, entries: dict[str, str]) -> None:
        self._entries = entries
        # Per task and thread: one scope object may be entered concurrently, e.g. by many tasks.
        self._tokens: ContextVar[tuple[tuple[object, object], ...]] = ContextVar(
            "genai_mlflow_scope_tokens", default=()
        )

    def _baggage(self, ctx: context.Context) -> dict[str, str]:
        return self._entries

    def _attach(self) -> tuple[object, object]:
        ctx = context.get_current()
        for key, value in self._baggage(ctx).items():
            ctx = baggage.set_baggage(key, value, ctx)
        # Loads inside this scope stay in it; loads from outer scopes count here too.
        loads = _loaded_prompts.get()
        inherited = loads.refs if loads.in_scope else ()
        loads_token = _loaded_prompts.set(LoadedPrompts(inherited, in_scope=True))
        return context.attach(ctx), loads_token

    @staticmethod
    def _detach(tokens: tuple[object, object]) -> None:
        context_token, loads_token = tokens
        _loaded_prompts.reset(loads_token)  # type: ignore[arg-type]
        context.detach(context_token)  # type: ignore[arg-type]

    def __enter__(self) -> Any:
        tokens = self._attach()
        self._tokens.set((*self._tokens.get(), tokens))
        return self

    def __exit__(self, *exc: object) -> None:
        *rest, tokens = self._tokens.get()
        self._tokens.set(tuple(rest))
        self._detach(tokens)

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_scoped(*args: Any, **kwargs: Any) -> Any:
                tokens = self._attach()
                try:
                    return await func(*args, **kwargs)
                finally:
                    self._detach(tokens)

            return async_scoped  # type: ignore[return-value]

        @functools.wraps(func)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            tokens = self._attach()
            try:
                return func(*args, **kwargs)
            finally:
                self._detach(tokens)

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


# Prompt names and versions travel in baggage as "name/version,name/version": no separators in them.
_BAD_REF_CHARS = re.compile(r"[,;=/\\\x00-\x1f\x7f]")


def _checked(what: str, value: str) -> str:
    if not value or value != value.strip():
        raise ValueError(f"prompt {what} must be non-empty, without spaces at its ends; got {value!r}")
    found = _BAD_REF_CHARS.search(value)
    if found:
        raise ValueError(f"prompt {what} {value!r} contains {found.group()!r}, which is not allowed")
    return value


class _PromptScope(_BaggageScope):
    def __init__(self, name: str, version: str) -> None:
        super().__init__({sc.GENAI_MLFLOW_PROMPT_NAME: name, sc.GENAI_MLFLOW_PROMPT_VERSION: version})
        self.name = name
        self.version = version

    def _baggage(self, ctx: context.Context) -> dict[str, str]:
        # Outer prompts are kept, outermost first; an inner scope's version of the same name wins.
        outer = baggage.get_baggage(sc.GENAI_MLFLOW_PROMPTS, ctx)
        refs = [r for r in str(outer).split(",") if r and r.split("/", 1)[0] != self.name] if outer else []
        refs.append(f"{self.name}/{self.version}")
        return {**self._entries, sc.GENAI_MLFLOW_PROMPTS: ",".join(refs)}


def prompt(name: Any, version: str | int | None = None) -> _PromptScope:
    """Every LLM call inside carries this prompt's name and version.

    ``prompt("greeting", 2)``, or ``prompt(mlflow.genai.load_prompt("prompts:/greeting/2"))`` with
    a ``PromptVersion`` from MLflow's Prompt Registry. Scopes nest; a call carries all of them.
    """
    if version is None and not isinstance(name, str):
        prompt_version = name
        name = getattr(prompt_version, "name", None)
        version = getattr(prompt_version, "version", None)
        if not isinstance(name, str) or version is None:
            raise TypeError(
                "prompt() takes a name and a version, or a PromptVersion from mlflow.genai.load_prompt; "
                f"got {type(prompt_version).__name__}"
            )
    if not isinstance(name, str):
        raise TypeError(f"prompt name must be a string, got {type(name).__name__}")
    if version is None:
        raise TypeError(f"prompt({name!r}) needs a version, e.g. prompt({name!r}, 1)")
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        raise TypeError(f"prompt version must be a string or an int, got {type(version).__name__}")
    return _PromptScope(_checked("name", name), _checked("version", str(version)))


class _VariantScope(_BaggageScope):
    def __init__(self, test_name: str, name: str) -> None:
        super().__init__({sc.GENAI_MLFLOW_AB_TEST: test_name, sc.GENAI_MLFLOW_VARIANT: name})
        self.test_name = test_name
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"variant({self.test_name!r}: {self.name!r})"


def variant(
    test_name: str, variants: Sequence[str], *, key: str, weights: Sequence[float] | None = None
) -> _VariantScope:
    """Pick one of ``variants`` for ``key`` (a user or session id), the same one every time and in
    every process, in proportion to ``weights``; every LLM call inside records the assignment.

    The scope is also the answer: ``with variant("tone", ["short", "long"], key=user) as v:`` and
    then ``v.name``. The innermost variant scope is the one a call records.
    """
    validate(test_name, variants, weights)
    return _VariantScope(test_name, assign(test_name, variants, key, weights))
