"""Pure translation of OpenAI requests and responses into GenAI span attributes.

Nothing here does I/O or touches OpenTelemetry state: data in, attributes out. Request values may be
plain dicts (as users write them) or the client's pydantic models (as users pass back a previous
answer), so every read goes through ``_get``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from genai_mlflow import semconv as sc

logger = logging.getLogger("genai_mlflow.instrumentation")

Attributes = dict[str, Any]
Redactor = Callable[[str], str]

DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
REDACTION_FAILED = "[withheld: the redaction hook failed]"
TRUNCATION_MARKER = "...[truncated by genai-mlflow: {total} characters in all]"
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")

# Parameters whose values are content, or client options rather than request parameters.
_NOT_PARAMETERS = frozenset(
    {
        "messages",
        "input",
        "instructions",
        "prompt",
        "tools",
        "functions",
        "prediction",
        "extra_headers",
        "extra_query",
        "extra_body",
        "timeout",
        "model",
        "stream",
        "response_format",
        "text_format",
        "text",
        "stream_options",
        "tool_choice",
        "function_call",
        "conversation",
        "previous_response_id",
        "suffix",
        "audio",
    }
)
# Parameters with a semconv name of their own.
_NAMED_PARAMETERS: dict[str, str] = {
    "max_tokens": sc.GEN_AI_REQUEST_MAX_TOKENS,
    "max_completion_tokens": sc.GEN_AI_REQUEST_MAX_TOKENS,
    "max_output_tokens": sc.GEN_AI_REQUEST_MAX_TOKENS,
    "temperature": sc.GEN_AI_REQUEST_TEMPERATURE,
    "top_p": sc.GEN_AI_REQUEST_TOP_P,
    "frequency_penalty": sc.GEN_AI_REQUEST_FREQUENCY_PENALTY,
    "presence_penalty": sc.GEN_AI_REQUEST_PRESENCE_PENALTY,
    "seed": sc.GEN_AI_REQUEST_SEED,
    "service_tier": sc.OPENAI_REQUEST_SERVICE_TIER,
    "dimensions": sc.GEN_AI_EMBEDDINGS_DIMENSION_COUNT,
}
_RESPONSES_FINISH = {"max_output_tokens": "length", "content_filter": "content_filter"}


@dataclass(frozen=True)
class ContentPolicy:
    """What message content goes on spans, after redaction, and how large one value may be."""

    capture: bool = False
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    redact: Redactor | None = None

    def text(self, value: str) -> str:
        if self.redact is None:
            return value
        try:
            return self.redact(value)
        except Exception:
            # Never let unredacted content through because the hook failed.
            logger.exception("genai-mlflow's redaction hook failed; the value is withheld")
            return REDACTION_FAILED

    def dumps(self, value: Any) -> str:
        """JSON for one attribute, cut to the size bound with a marker saying how much there was."""
        encoded = _ENCODER.encode(value)
        # Lone surrogates (a JSON "\udcff" escape, surrogateescape'd bytes) are not UTF-8: the
        # OTLP encoder would drop the whole attribute. They become U+FFFD.
        if not encoded.isascii():
            encoded = _LONE_SURROGATES.sub("\ufffd", encoded)
        return truncate(encoded, self.max_value_bytes)


NO_CONTENT = ContentPolicy()
# One encoder for every value: json.dumps builds a new one per call when given options.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def truncate(value: str, max_bytes: int) -> str:
    if len(value) <= max_bytes // 4:  # fast path: cannot exceed the bound even at 4 bytes a char
        return value
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return value
    marker = TRUNCATION_MARKER.format(total=len(value))
    keep = max(0, max_bytes - len(marker.encode()))
    return encoded[:keep].decode("utf-8", "ignore") + marker


def _get(obj: Any, key: str, default: Any = None) -> Any:
    cls = type(obj)
    if cls is dict or _is_mapping(cls):
        return obj.get(key, default)
    # The client's pydantic models: read fields from __dict__ first, since a missing attribute
    # costs pydantic an exception raised and caught.
    fields = getattr(obj, "__dict__", None)
    if fields is None:
        return getattr(obj, key, default)
    if key in fields:
        return fields[key]
    extra = getattr(obj, "__pydantic_extra__", None)
    if extra is not None and key in extra:
        return extra[key]
    if _model_lacks(cls, key):
        return default
    return getattr(obj, key, default)


# Facts about types, cached: answering them costs ABC and metaclass lookups on every read. Types
# are few, but a program could make them on the fly, so the caches are bounded.
_TYPE_CACHE_LIMIT = 4096
_MAPPING_TYPES: dict[type, bool] = {}
_MODEL_LACKS: dict[tuple[type, str], bool] = {}


def _is_mapping(cls: type) -> bool:
    found = _MAPPING_TYPES.get(cls)
    if found is None:
        found = issubclass(cls, Mapping)
        if len(_MAPPING_TYPES) < _TYPE_CACHE_LIMIT:
            _MAPPING_TYPES[cls] = found
    return found


def _model_lacks(cls: type, key: str) -> bool:
    """A pydantic model class without that field, and no property or method of that name."""
    found = _MODEL_LACKS.get((cls, key))
    if found is None:
        found = hasattr(cls, "model_fields") and not hasattr(cls, key)
        if len(_MODEL_LACKS) < _TYPE_CACHE_LIMIT:
            _MODEL_LACKS[cls, key] = found
    return found


def _is_primitive(value: Any) -> bool:
    return isinstance(value, str | bool | int | float)


# ---------------------------------------------------------------------------------------------
# Requests


def request_attributes(
    operation: str, provider: str, kwargs: Mapping[str, Any], not_given: tuple[type, ...]
) -> Attributes:
    """Attributes known before the call: operation, provider, model and every parameter given."""
    model = kwargs.get("model")
    attrs: Attributes = {
        sc.GEN_AI_OPERATION_NAME: operation,
        sc.GEN_AI_PROVIDER_NAME: provider,
    }
    if isinstance(model, str):
        attrs[sc.GEN_AI_REQUEST_MODEL] = model
    stream = kwargs.get("stream")
    attrs[sc.GEN_AI_REQUEST_STREAM] = stream is True
    for name, value in kwargs.items():
        if value is None or name in _NOT_PARAMETERS or isinstance(value, not_given):
            continue
        _add_parameter(attrs, name, value)
    output_type = _output_type(kwargs.get("response_format"), kwargs.get("text"), kwargs.get("text_format"))
    if output_type:
        attrs[sc.GEN_AI_OUTPUT_TYPE] = output_type
    return attrs


def _add_parameter(attrs: Attributes, name: str, value: Any) -> None:
    if name == "n":
        if isinstance(value, int) and value != 1:
            attrs[sc.GEN_AI_REQUEST_CHOICE_COUNT] = value
        return
    if name == "stop":
        attrs[sc.GEN_AI_REQUEST_STOP_SEQUENCES] = [value] if isinstance(value, str) else list(value)
        return
    if name == "encoding_format":
        attrs[sc.GEN_AI_REQUEST_ENCODING_FORMATS] = [str(value)]
        return
    key = _NAMED_PARAMETERS.get(name)
    if key is not None:
        attrs[key] = value
    elif _is_primitive(value):
        attrs[sc.GEN_AI_REQUEST_PREFIX + name] = value
    elif isinstance(value, list | tuple) and all(_is_primitive(v) for v in value):
        attrs[sc.GEN_AI_REQUEST_PREFIX + name] = list(value)
    elif isinstance(value, Mapping):
        attrs[sc.GEN_AI_REQUEST_PREFIX + name] = json.dumps(value, default=str, sort_keys=True)


def _output_type(response_format: Any, text: Any, text_format: Any) -> str | None:
    if isinstance(response_format, type) or text_format is not None:
        return "json"  # a pydantic model given to parse()
    kind = _get(response_format, "type") if response_format is not None else None
    if kind is None and text is not None:
        kind = _get(_get(text, "format"), "type")
    if kind in ("json_object", "json_schema"):
        return "json"
    if kind == "text":
        return "text"
    return None


def tool_definitions(tools: Any, policy: ContentPolicy) -> str | None:
    """``gen_ai.tool.definitions``: type and name always, the full definition with content on."""
    if not tools:
        return None
    out = []
    for tool in tools:
        kind = _get(tool, "type", "function")
        function = _get(tool, "function")
        source = function if function is not None else tool
        entry: dict[str, Any] = {"type": kind, "name": _get(source, "name")}
        if policy.capture:
            for key in ("description", "parameters", "strict"):
                value = _get(source, key)
                if value is not None:
                    entry[key] = value
        out.append(entry)
    return policy.dumps(out)


def chat_input_content(messages: Any, policy: ContentPolicy) -> Attributes:
    """``gen_ai.input.messages`` and ``gen_ai.system_instructions`` from chat messages."""
    system: list[dict[str, Any]] = []
    converted: list[dict[str, Any]] = []
    for message in messages or ():
        role = _get(message, "role")
        if role in ("system", "developer"):
            system.extend(_text_parts(_get(message, "content"), policy))
            continue
        parts = []
        if role == "tool":
            parts.append(
                {
                    "type": "tool_call_response",
                    "id": _get(message, "tool_call_id"),
                    "response": policy.text(_plain_text(_get(message, "content"))),
                }
            )
        else:
            parts.extend(_text_parts(_get(message, "content"), policy))
            parts.extend(_tool_call_parts(_get(message, "tool_calls"), policy))
        converted.append({"role": role, "parts": parts})
    return _content_attributes(converted, system, policy)


def responses_input_content(input_: Any, instructions: Any, policy: ContentPolicy) -> Attributes:
    """The same for the Responses API, whose input is a string or a list of items."""
    system = _text_parts(instructions, policy) if instructions else []
    converted: list[dict[str, Any]] = []
    if isinstance(input_, str):
        converted.append({"role": "user", "parts": [{"type": "text", "content": policy.text(input_)}]})
    else:
        for item in input_ or ():
            kind = _get(item, "type", "message")
            if kind == "function_call_output":
                part = {
                    "type": "tool_call_response",
                    "id": _get(item, "call_id"),
                    "response": policy.text(_plain_text(_get(item, "output"))),
                }
                converted.append({"role": "tool", "parts": [part]})
            elif kind == "function_call":
                converted.append({"role": "assistant", "parts": [_function_call_part(item, policy)]})
            elif kind == "message":
                role = _get(item, "role", "user")
                parts = _text_parts(_get(item, "content"), policy)
                if role in ("system", "developer"):
                    system.extend(parts)
                else:
                    converted.append({"role": role, "parts": parts})
    return _content_attributes(converted, system, policy)


def _content_attributes(
    messages: list[dict[str, Any]], system: list[dict[str, Any]], policy: ContentPolicy
) -> Attributes:
    attrs: Attributes = {}
    if messages:
        attrs[sc.GEN_AI_INPUT_MESSAGES] = policy.dumps(messages)
    if system:
        attrs[sc.GEN_AI_SYSTEM_INSTRUCTIONS] = policy.dumps(system)
    return attrs


def _plain_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, Mapping):
        return "".join(_get(part, "text") or "" for part in content)
    return str(content)


def _text_parts(content: Any, policy: ContentPolicy) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": policy.text(content)}]
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = _get(part, "type")
        text = _get(part, "text")
        if text is not None:  # text, input_text, output_text
            parts.append({"type": "text", "content": policy.text(text)})
        elif kind in ("image_url", "input_image"):
            image = _get(part, "image_url")
            uri = _get(image, "url") if not isinstance(image, str) else image
            parts.append(_image_part(uri))
        elif kind is not None:
            parts.append({"type": str(kind)})
    return parts


def _image_part(uri: Any) -> dict[str, Any]:
    """Data URLs are inline blobs in the semconv schema; other URLs are references."""
    if isinstance(uri, str) and uri.startswith("data:") and "," in uri:
        header, data = uri[5:].split(",", 1)
        return {
            "type": "blob",
            "modality": "image",
            "mime_type": header.split(";")[0] or None,
            "content": data,
        }
    return {"type": "uri", "modality": "image", "uri": uri}


def _tool_call_parts(tool_calls: Any, policy: ContentPolicy) -> list[dict[str, Any]]:
    parts = []
    for call in tool_calls or ():
        function = _get(call, "function")
        parts.append(
            {
                "type": "tool_call",
                "id": _get(call, "id"),
                "name": _get(function, "name"),
                "arguments": _arguments(_get(function, "arguments"), policy),
            }
        )
    return parts


def _function_call_part(item: Any, policy: ContentPolicy) -> dict[str, Any]:
    return {
        "type": "tool_call",
        "id": _get(item, "call_id"),
        "name": _get(item, "name"),
        "arguments": _arguments(_get(item, "arguments"), policy),
    }


def _arguments(raw: Any, policy: ContentPolicy) -> Any:
    if not isinstance(raw, str):
        return raw
    text = policy.text(raw)
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------------------------------------
# Responses


@dataclass
class ToolCall:
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Choice:
    """One answer, from a whole response or accumulated from stream chunks."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def usage_attributes(usage: Any) -> Attributes:
    """Token counts from chat, legacy completion, embeddings or Responses API usage objects."""
    if usage is None:
        return {}
    attrs: Attributes = {}
    input_tokens = _get(usage, "input_tokens")
    if input_tokens is None:
        input_tokens = _get(usage, "prompt_tokens")
    output_tokens = _get(usage, "output_tokens")
    if output_tokens is None:
        output_tokens = _get(usage, "completion_tokens")
    if isinstance(input_tokens, int):
        attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = input_tokens
    if isinstance(output_tokens, int):
        attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = output_tokens
    input_details = _get(usage, "input_tokens_details") or _get(usage, "prompt_tokens_details")
    cached = _get(input_details, "cached_tokens") if input_details is not None else None
    if isinstance(cached, int):
        attrs[sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = cached
    output_details = _get(usage, "output_tokens_details") or _get(usage, "completion_tokens_details")
    reasoning = _get(output_details, "reasoning_tokens") if output_details is not None else None
    if isinstance(reasoning, int):
        attrs[sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = reasoning
    return attrs


def response_header_attributes(response: Any) -> Attributes:
    """id, model, service tier and fingerprint, shared by whole responses and stream chunks."""
    attrs: Attributes = {}
    for key, attr in (
        ("id", sc.GEN_AI_RESPONSE_ID),
        ("model", sc.GEN_AI_RESPONSE_MODEL),
        ("service_tier", sc.OPENAI_RESPONSE_SERVICE_TIER),
        ("system_fingerprint", sc.OPENAI_RESPONSE_SYSTEM_FINGERPRINT),
    ):
        value = _get(response, key)
        if isinstance(value, str):
            attrs[attr] = value
    return attrs


def chat_choices(response: Any) -> list[Choice]:
    choices = []
    for choice in _get(response, "choices") or ():
        message = _get(choice, "message")
        text = _get(choice, "text")  # legacy completions
        if text is None and message is not None:
            text = _get(message, "content") or _get(message, "refusal")
        calls = [_tool_call(c) for c in (_get(message, "tool_calls") or ())] if message is not None else []
        choices.append(Choice([text] if text else [], _get(choice, "finish_reason"), calls))
    return choices


def _tool_call(call: Any) -> ToolCall:
    function = _get(call, "function")
    return ToolCall(_get(call, "id"), _get(function, "name"), _get(function, "arguments") or "")


def responses_choice(response: Any) -> Choice:
    """The Responses API's output items as one choice, with a chat-style finish reason."""
    choice = Choice()
    for item in _get(response, "output") or ():
        kind = _get(item, "type")
        if kind == "message":
            for part in _get(item, "content") or ():
                text = _get(part, "text") or _get(part, "refusal")
                if text:
                    choice.text.append(text)
        elif kind == "function_call":
            choice.tool_calls.append(
                ToolCall(_get(item, "call_id"), _get(item, "name"), _get(item, "arguments") or "")
            )
    status = _get(response, "status")
    if status == "incomplete":
        reason = _get(_get(response, "incomplete_details"), "reason")
        choice.finish_reason = _RESPONSES_FINISH.get(reason, str(reason))
    elif status == "failed":
        choice.finish_reason = "error"
    elif status == "completed":
        choice.finish_reason = "tool_calls" if choice.tool_calls else "stop"
    else:
        choice.finish_reason = status
    return choice


def output_attributes(choices: Sequence[Choice], policy: ContentPolicy) -> Attributes:
    """finish reasons, tool call ids and names, and (with content on) the output messages."""
    attrs: Attributes = {}
    reasons = [c.finish_reason for c in choices if c.finish_reason]
    if reasons:
        attrs[sc.GEN_AI_RESPONSE_FINISH_REASONS] = reasons
    calls = [call for c in choices for call in c.tool_calls]
    if calls:
        attrs[sc.GENAI_MLFLOW_TOOL_CALL_IDS] = [call.id or "" for call in calls]
        attrs[sc.GENAI_MLFLOW_TOOL_CALL_NAMES] = [call.name or "" for call in calls]
    if policy.capture and choices:
        messages = []
        for c in choices:
            parts: list[dict[str, Any]] = []
            if c.text:
                parts.append({"type": "text", "content": policy.text("".join(c.text))})
            parts.extend(
                {
                    "type": "tool_call",
                    "id": call.id,
                    "name": call.name,
                    "arguments": _arguments(call.arguments, policy),
                }
                for call in c.tool_calls
            )
            messages.append({"role": "assistant", "parts": parts, "finish_reason": c.finish_reason or ""})
        attrs[sc.GEN_AI_OUTPUT_MESSAGES] = policy.dumps(messages)
    return attrs


def embeddings_input_content(input_: Any, policy: ContentPolicy) -> Attributes:
    if isinstance(input_, str):
        texts = [input_]
    elif isinstance(input_, list) and all(isinstance(i, str) for i in input_):
        texts = input_
    else:
        return {}  # token arrays carry no readable content
    parts = [{"type": "text", "content": policy.text(t)} for t in texts]
    return {sc.GEN_AI_INPUT_MESSAGES: policy.dumps([{"role": "user", "parts": parts}])}


def embeddings_attributes(response: Any) -> Attributes:
    attrs = response_header_attributes(response)
    attrs.update(usage_attributes(_get(response, "usage")))
    data = _get(response, "data") or ()
    if data:
        vector = _get(data[0], "embedding")
        if isinstance(vector, list):
            attrs[sc.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = len(vector)
    return attrs
