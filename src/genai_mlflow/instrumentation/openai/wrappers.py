"""The wrapt wrappers around the client's methods: start a span, call through, finish the span.

The hot path does as little as it can: one context lookup for suppression and re-entry, a dict of
request attributes, the span, and reading the response the client already parsed. Any failure of
ours is logged and the user's call goes on untouched.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

from opentelemetry import baggage, context
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind, Tracer, set_span_in_context

from genai_mlflow import semconv as sc
from genai_mlflow.context import current_loaded_prompts, note_llm_call

from . import attributes as attrs
from .attributes import NO_CONTENT, Attributes, ContentPolicy
from .call import Instruments, LLMCall
from .finisher import Finisher
from .streams import (
    AsyncRawResponseProxy,
    ChatAccumulator,
    RawResponseProxy,
    ResponsesAccumulator,
    responses_result,
    wrap_stream,
)

logger = logging.getLogger("genai_mlflow.instrumentation")

RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"
# Set while one of our spans is open in this context: an instrumented method that calls another
# (parse -> create in some client versions) makes one span, not two.
_IN_CALL: ContextVar[bool] = ContextVar("genai_mlflow_in_llm_call", default=False)
_API_TYPES = {"chat": "chat_completions", "responses": "responses"}
_BAGGAGE_KEYS = (
    sc.GEN_AI_AGENT_NAME,
    sc.GEN_AI_CONVERSATION_ID,
    sc.USER_ID,
    sc.GENAI_MLFLOW_PROMPTS,
    sc.GENAI_MLFLOW_PROMPT_NAME,
    sc.GENAI_MLFLOW_PROMPT_VERSION,
    sc.GENAI_MLFLOW_AB_TEST,
    sc.GENAI_MLFLOW_VARIANT,
)
_CONTENT_KEYS = ("messages", "input", "instructions", "prompt", "tools")


@dataclass(frozen=True)
class Endpoint:
    """One patched client method and how to read its request and response."""

    module: str
    cls: str
    method: str
    kind: str  # "chat", "responses", "embeddings" or "completions"
    is_async: bool

    @property
    def operation(self) -> str:
        return {
            "chat": sc.OP_CHAT,
            "responses": sc.OP_RESPONSES,
            "embeddings": sc.OP_EMBEDDINGS,
            "completions": sc.OP_TEXT_COMPLETION,
        }[self.kind]


def _input_content(kind: str, kwargs: Mapping[str, Any], policy: ContentPolicy) -> Attributes:
    content: Attributes = {}
    if not policy.capture:
        pass
    elif kind == "chat":
        content = attrs.chat_input_content(kwargs.get("messages"), policy)
    elif kind == "responses":
        content = attrs.responses_input_content(kwargs.get("input"), kwargs.get("instructions"), policy)
    elif kind == "embeddings":
        content = attrs.embeddings_input_content(kwargs.get("input"), policy)
    elif kind == "completions":
        prompt = kwargs.get("prompt")
        if isinstance(prompt, str):
            content = attrs.embeddings_input_content(prompt, policy)
    tools = kwargs.get("tools")
    if tools and kind in ("chat", "responses"):
        definitions = attrs.tool_definitions(tools, policy)
        if definitions:
            content[sc.GEN_AI_TOOL_DEFINITIONS] = definitions
    return content


def _content_request(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What the content attributes are read from, kept until the call is finished. Lists are
    copied: agents append to the messages list they passed as soon as the call returns."""
    kept = {}
    for key in _CONTENT_KEYS:
        value = kwargs.get(key)
        if value is not None:
            kept[key] = list(value) if isinstance(value, list) else value
    return kept


def summarise(kind: str, response: Any, policy: ContentPolicy) -> Attributes:
    """Span attributes from a whole (non-streamed) response."""
    if kind == "responses":
        return responses_result(response, policy)
    if kind == "embeddings":
        return attrs.embeddings_attributes(response)
    result = attrs.response_header_attributes(response)
    result.update(attrs.usage_attributes(getattr(response, "usage", None)))
    result.update(attrs.output_attributes(attrs.chat_choices(response), policy))
    return result


def _new_accumulator(kind: str, policy: ContentPolicy) -> ChatAccumulator | ResponsesAccumulator:
    return ResponsesAccumulator(policy) if kind == "responses" else ChatAccumulator(policy)


def _server(instance: Any) -> tuple[str, Attributes]:
    """The provider name and server address of the client behind a resource, cached per client."""
    client = getattr(instance, "_client", None)
    if client is None:
        return sc.PROVIDER_OPENAI, {}
    try:
        cached = _SERVERS.get(client)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] is client.base_url:
        return cached[1], cached[2]
    url = client.base_url
    found: Attributes = {}
    provider = sc.PROVIDER_OPENAI
    if url is not None:
        host = url.host
        found[sc.SERVER_ADDRESS] = host
        found[sc.SERVER_PORT] = url.port or (443 if url.scheme == "https" else 80)
        if host.endswith((".openai.azure.com", ".cognitiveservices.azure.com")):
            provider = sc.PROVIDER_AZURE
    if type(client).__name__.startswith(("AzureOpenAI", "AsyncAzureOpenAI")):
        provider = sc.PROVIDER_AZURE
    with contextlib.suppress(TypeError):
        _SERVERS[client] = (url, provider, found)
    return provider, found


# Keyed by client; the base URL is kept to notice a client whose base_url was changed.
_SERVERS: weakref.WeakKeyDictionary[Any, tuple[Any, str, Attributes]] = weakref.WeakKeyDictionary()


class Tracing:
    """What every wrapper needs, fixed at ``instrument()`` time."""

    def __init__(
        self,
        tracer: Tracer,
        instruments: Instruments,
        policy: ContentPolicy,
        not_given: tuple[type, ...],
        finisher: Finisher,
        constant: Attributes | None = None,
    ) -> None:
        self.tracer = tracer
        self.instruments = instruments
        self.policy = policy
        self.not_given = not_given
        self.finisher = finisher
        self.constant = constant or {}  # on every span, e.g. the app's version

    def start(self, endpoint: Endpoint, instance: Any, kwargs: Mapping[str, Any]) -> LLMCall:
        provider, server = _server(instance)
        attributes = attrs.request_attributes(endpoint.operation, provider, kwargs, self.not_given)
        attributes.update(server)
        api_type = _API_TYPES.get(endpoint.kind)
        if api_type:
            attributes[sc.OPENAI_API_TYPE] = api_type
        attributes.update(self.constant)
        entries = baggage.get_all()
        if entries:
            for key in _BAGGAGE_KEYS:
                value = entries.get(key)
                if isinstance(value, str) and value:
                    attributes[key] = value
        loads = current_loaded_prompts()
        if loads:
            _add_loaded_prompts(attributes, loads)
        model = attributes.get(sc.GEN_AI_REQUEST_MODEL)
        name = f"{endpoint.operation} {model}" if model else endpoint.operation
        span = self.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        content = None
        if span.is_recording() and (self.policy.capture or kwargs.get("tools")):
            content = partial(_input_content, endpoint.kind, _content_request(kwargs), self.policy)
        return LLMCall(span, attributes, self.instruments, self.finisher, content)

    def finish(self, endpoint: Endpoint, call: LLMCall, result: Any, kwargs: Mapping[str, Any]) -> Any:
        """End the span from the result, or hand it to a proxy that ends it later."""
        policy = self.policy if call.span.is_recording() else NO_CONTENT
        kind = endpoint.kind
        raw = _raw_mode(kwargs)
        if raw == "stream" or (raw == "raw" and kwargs.get("stream") is True):
            proxy = AsyncRawResponseProxy if endpoint.is_async and raw == "stream" else RawResponseProxy
            return proxy(
                result,
                call,
                lambda parsed: summarise(kind, parsed, policy),
                lambda: _new_accumulator(kind, policy),
            )
        if kwargs.get("stream") is True:
            return wrap_stream(result, call, _new_accumulator(kind, policy), endpoint.is_async)
        parsed = result.parse() if raw == "raw" else result
        call.end(partial(summarise, kind, parsed, policy))
        return result


def _add_loaded_prompts(attributes: Attributes, loads: tuple[str, ...]) -> None:
    """Prompts loaded from the registry join those of ``prompt()`` scopes; the latest load names
    the call's prompt where no scope did."""
    given = attributes.get(sc.GENAI_MLFLOW_PROMPTS)
    refs = str(given).split(",") if given else []
    refs += [ref for ref in loads if ref not in refs]
    attributes[sc.GENAI_MLFLOW_PROMPTS] = ",".join(refs)
    if sc.GENAI_MLFLOW_PROMPT_NAME not in attributes:
        name, _, version = loads[-1].partition("/")
        attributes[sc.GENAI_MLFLOW_PROMPT_NAME] = name
        attributes[sc.GENAI_MLFLOW_PROMPT_VERSION] = version


def _raw_mode(kwargs: Mapping[str, Any]) -> str | None:
    headers = kwargs.get("extra_headers")
    if not headers:
        return None
    mode = headers.get(RAW_RESPONSE_HEADER)
    if mode == "stream":  # with_streaming_response: the body is not read yet
        return "stream"
    return "raw" if mode else None  # with_raw_response: "true" (or "raw" in some versions)


Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]


def make_wrapper(endpoint: Endpoint, tracing: Tracing) -> Wrapper:
    """A wrapt wrapper for one endpoint, sync or async."""

    def begin(instance: Any, kwargs: dict[str, Any]) -> LLMCall | None:
        if _IN_CALL.get() or not is_instrumentation_enabled():
            return None
        try:
            note_llm_call()
            return tracing.start(endpoint, instance, kwargs)
        except Exception:
            logger.exception("genai-mlflow could not start a span for %s", endpoint.method)
            return None

    def complete(call: LLMCall, result: Any, kwargs: dict[str, Any]) -> Any:
        try:
            return tracing.finish(endpoint, call, result, kwargs)
        except Exception:
            logger.exception("genai-mlflow could not record a response")
            call.end()
            return result

    def sync_wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call = begin(instance, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        in_call = _IN_CALL.set(True)
        token = context.attach(set_span_in_context(call.span))
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            call.end(error=exc)
            raise
        finally:
            context.detach(token)
            _IN_CALL.reset(in_call)
        return complete(call, result, kwargs)

    async def async_wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call = begin(instance, kwargs)
        if call is None:
            return await wrapped(*args, **kwargs)
        in_call = _IN_CALL.set(True)
        token = context.attach(set_span_in_context(call.span))
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            call.end(error=exc)
            raise
        finally:
            context.detach(token)
            _IN_CALL.reset(in_call)
        return complete(call, result, kwargs)

    return async_wrapper if endpoint.is_async else sync_wrapper
