"""Seed-compatible helpers: the old tracking API, on the same spans and pipeline.

A user of the old helpers migrates by changing an import. Each helper makes sure
``genai_mlflow.instrument()`` has run; each LLM call becomes one GenAI span, so it lands as a run and
a trace like any instrumented call, and is never counted twice.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from genai_mlflow import semconv as sc
from genai_mlflow.context import llm_call_counter, persona
from genai_mlflow.instrumentation.openai.attributes import (
    Choice,
    ContentPolicy,
    chat_input_content,
    output_attributes,
)
from genai_mlflow.setup import current_handle, instrument

F = TypeVar("F", bound=Callable[..., Any])
_TRACER_NAME = "genai_mlflow.tracking"


def _ensure_instrumented() -> None:
    if current_handle() is None:
        instrument()


def _content_policy() -> ContentPolicy:
    handle = current_handle()
    settings = handle.settings if handle is not None else None
    max_bytes = settings.max_value_bytes if settings is not None else 1024 * 1024
    from genai_mlflow.config import resolve_capture_content

    return ContentPolicy(capture=resolve_capture_content(None, default=True), max_value_bytes=max_bytes)


def emit_llm_span(
    *,
    persona_id: str | None,
    model: str | None,
    prompt: str | None,
    response: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    latency_ms: float | None,
    error: BaseException | None = None,
) -> None:
    """One GenAI span for an LLM call the app made by itself, ending now."""
    end_ns = time.time_ns()
    start_ns = end_ns - int((latency_ms or 0) * 1_000_000)
    attributes: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: sc.OP_CHAT,
        sc.GEN_AI_PROVIDER_NAME: sc.PROVIDER_OPENAI,
    }
    if model:
        attributes[sc.GEN_AI_REQUEST_MODEL] = model
    if persona_id:
        attributes[sc.GEN_AI_AGENT_NAME] = persona_id
    if isinstance(prompt_tokens, int):
        attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = prompt_tokens
    if isinstance(completion_tokens, int):
        attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = completion_tokens
    policy = _content_policy()
    if prompt is not None:
        attributes.update(chat_input_content([{"role": "user", "content": prompt}], policy))
    if response is not None:
        attributes.update(output_attributes([Choice([response], "stop")], policy))
    tracer = trace.get_tracer(_TRACER_NAME)
    span = tracer.start_span(
        f"{sc.OP_CHAT} {model}" if model else sc.OP_CHAT,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        start_time=start_ns,
    )
    if error is not None:
        span.set_attribute(sc.ERROR_TYPE, type(error).__qualname__)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    span.end(end_time=end_ns)


class MLflowExperimentTracker:
    """The seed's tracker: ``track_llm_call`` logs one LLM call; it returns None, like the seed's."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self._tracking_uri = tracking_uri

    def track_llm_call(
        self,
        persona_id: str,
        model: str,
        prompt: str,
        response: str,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
    ) -> None:
        if current_handle() is None:
            instrument(self._tracking_uri)
        emit_llm_span(
            persona_id=persona_id,
            model=model,
            prompt=prompt,
            response=response,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=latency_ms,
        )


def _from_result(result: Any) -> dict[str, Any]:
    """What a decorated function's result says about its LLM call: a client response, a mapping
    in the tracker's own terms, or the answer text."""
    if isinstance(result, str):
        return {"response": result}
    if isinstance(result, Mapping):
        keys = ("model", "prompt", "response", "prompt_tokens", "completion_tokens")
        return {k: result.get(k) for k in keys}
    usage = getattr(result, "usage", None)
    choices = getattr(result, "choices", None) or []
    message = getattr(choices[0], "message", None) if choices else None
    return {
        "model": getattr(result, "model", None),
        "response": getattr(message, "content", None),
        "prompt_tokens": getattr(usage, "prompt_tokens", None),
        "completion_tokens": getattr(usage, "completion_tokens", None),
    }


def track_llm_call(persona_id: str) -> Callable[[F], F]:
    """Decorator (sync and async): a persona scope around the function. When no instrumented call
    happened inside, one LLM span is made from its result, so no call is counted twice."""

    def decorate(func: F) -> F:
        def record(result: Any, calls: list[int], started: float, error: BaseException | None) -> None:
            if calls[0]:
                return  # the instrumentation already traced the call(s) inside
            found = _from_result(result) if error is None else {}
            emit_llm_span(
                persona_id=persona_id,
                model=found.get("model"),
                prompt=found.get("prompt"),
                response=found.get("response"),
                prompt_tokens=found.get("prompt_tokens"),
                completion_tokens=found.get("completion_tokens"),
                latency_ms=(time.perf_counter() - started) * 1000,
                error=error,
            )

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_tracked(*args: Any, **kwargs: Any) -> Any:
                _ensure_instrumented()
                calls = [0]
                token = llm_call_counter.set(calls)
                started = time.perf_counter()
                try:
                    async with persona(persona_id):
                        result = await func(*args, **kwargs)
                except BaseException as exc:
                    record(None, calls, started, exc)
                    raise
                finally:
                    llm_call_counter.reset(token)
                record(result, calls, started, None)
                return result

            return async_tracked  # type: ignore[return-value]

        @functools.wraps(func)
        def tracked(*args: Any, **kwargs: Any) -> Any:
            _ensure_instrumented()
            calls = [0]
            token = llm_call_counter.set(calls)
            started = time.perf_counter()
            try:
                with persona(persona_id):
                    result = func(*args, **kwargs)
            except BaseException as exc:
                record(None, calls, started, exc)
                raise
            finally:
                llm_call_counter.reset(token)
            record(result, calls, started, None)
            return result

        return tracked  # type: ignore[return-value]

    return decorate


def chat_with_tracking(model: str, prompt: str, persona_id: str, client: Any = None, **kwargs: Any) -> str:
    """One chat completion under ``persona_id``, traced by the instrumentation; returns the text."""
    _ensure_instrumented()
    if client is None:
        import openai

        client = openai.OpenAI()
    with persona(persona_id):
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], **kwargs
        )
    return str(response.choices[0].message.content or "")
