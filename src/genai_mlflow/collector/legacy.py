"""Older GenAI attribute styles, rewritten in place to the current semantic conventions that the
records layer (and MLflow) read. Pure: a span in, the same span changed, no I/O.

What is translated, when the current attribute is not already there (the older one is removed):

- ``gen_ai.system`` -> ``gen_ai.provider.name`` (older values such as ``az.ai.openai`` renamed);
- ``gen_ai.usage.prompt_tokens`` / ``completion_tokens`` -> ``input_tokens`` / ``output_tokens``, and
  the cache-read and reasoning token counts of OpenLLMetry (Traceloop);
- OpenLLMetry's flattened messages ``gen_ai.prompt.N.*`` and ``gen_ai.completion.N.*`` (role, content,
  finish_reason, tool_calls.M.*, tool_call_id) -> ``gen_ai.input.messages`` / ``gen_ai.output.messages``
  as JSON in the conventions' parts schema, and ``llm.request.functions.N.*`` ->
  ``gen_ai.tool.definitions``;
- ``llm.request.type`` (OpenLLMetry before ``gen_ai.operation.name``) -> ``gen_ai.operation.name``;
- the official OpenAI instrumentation before 2.x (``opentelemetry-instrumentation-openai-v2``):
  ``gen_ai.openai.request.*`` / ``gen_ai.openai.response.*`` -> ``gen_ai.request.seed``,
  ``gen_ai.output.type`` and ``openai.{request,response}.*``;
- semantic conventions 1.26's span events ``gen_ai.content.prompt`` / ``gen_ai.content.completion``
  (attributes ``gen_ai.prompt`` / ``gen_ai.completion``, OpenAI-style message JSON) -> the messages.

The current official instrumentation (``opentelemetry-instrumentation-genai-openai``) and current
OpenLLMetry already emit the current attributes; their spans pass unchanged. Persona needs no
translation: ``gen_ai.agent.name`` on a span or on the resource is read by the records layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from genai_mlflow import semconv as sc
from genai_mlflow.exporter.records import any_value

# Older names, spelt out here: semconv.py holds the names this package writes and reads itself.
GEN_AI_USAGE_PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
GEN_AI_USAGE_COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
LLM_REQUEST_TYPE: Final = "llm.request.type"
GEN_AI_PROMPT: Final = "gen_ai.prompt"
GEN_AI_COMPLETION: Final = "gen_ai.completion"
EVENT_CONTENT_PROMPT: Final = "gen_ai.content.prompt"
EVENT_CONTENT_COMPLETION: Final = "gen_ai.content.completion"

# old key -> current key; the value is kept as it is.
_RENAMES: Final = {
    GEN_AI_USAGE_PROMPT_TOKENS: sc.GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_COMPLETION_TOKENS: sc.GEN_AI_USAGE_OUTPUT_TOKENS,
    "gen_ai.usage.cache_read_input_tokens": sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    "gen_ai.usage.reasoning_tokens": sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    "gen_ai.openai.request.seed": sc.GEN_AI_REQUEST_SEED,
    "gen_ai.openai.request.service_tier": sc.OPENAI_REQUEST_SERVICE_TIER,
    "gen_ai.openai.response.service_tier": sc.OPENAI_RESPONSE_SERVICE_TIER,
    "gen_ai.openai.response.system_fingerprint": sc.OPENAI_RESPONSE_SYSTEM_FINGERPRINT,
    "gen_ai.is_streaming": sc.GEN_AI_REQUEST_STREAM,
    "llm.is_streaming": sc.GEN_AI_REQUEST_STREAM,
    "llm.frequency_penalty": sc.GEN_AI_REQUEST_FREQUENCY_PENALTY,
    "llm.presence_penalty": sc.GEN_AI_REQUEST_PRESENCE_PENALTY,
}
_RESPONSE_FORMAT: Final = "gen_ai.openai.request.response_format"
_OUTPUT_TYPES: Final = {"json_object": "json", "json_schema": "json", "text": "text"}
_PROVIDERS: Final = {
    "az.ai.openai": sc.PROVIDER_AZURE,
    "az.ai.inference": "azure.ai.inference",
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
}
_OPERATIONS: Final = {
    "chat": sc.OP_CHAT,
    "completion": sc.OP_TEXT_COMPLETION,
    "embedding": sc.OP_EMBEDDINGS,
    "embeddings": sc.OP_EMBEDDINGS,
}
_FLAT_MESSAGE = re.compile(r"^gen_ai\.(prompt|completion)\.(\d+)\.(.+)$")
_FLAT_FUNCTION = re.compile(r"^llm\.request\.functions\.(\d+)\.(.+)$")
_TOOL_CALL_FIELD = re.compile(r"^tool_calls\.(\d+)\.(.+)$")
_LEGACY_PREFIXES: Final = ("gen_ai.prompt.", "gen_ai.completion.", "llm.", "gen_ai.openai.")
_LEGACY_KEYS: Final = frozenset({*_RENAMES, sc.GEN_AI_SYSTEM, _RESPONSE_FORMAT})


def needs_translation(span: Span) -> bool:
    """Cheap test: whether ``translate`` could change anything."""
    for kv in span.attributes:
        key = kv.key
        if key in _LEGACY_KEYS or key.startswith(_LEGACY_PREFIXES):
            return True
    return any(event.name in (EVENT_CONTENT_PROMPT, EVENT_CONTENT_COMPLETION) for event in span.events)


def translate(span: Span) -> bool:
    """Rewrite the span's older GenAI attributes to current ones; True if it changed."""
    if not needs_translation(span):
        return False
    attrs: dict[str, AnyValue] = {}
    for kv in span.attributes:
        attrs[kv.key] = kv.value  # the last wins, as the records layer reads them
    before = dict(attrs)
    _rename(attrs)
    _provider(attrs)
    _operation(attrs)
    _output_type(attrs)
    _flat_messages(attrs)
    _flat_functions(attrs)
    _event_messages(span, attrs)
    if attrs.keys() == before.keys() and all(attrs[k] is before[k] for k in attrs):
        return False
    values = list(attrs.items())
    del span.attributes[:]
    span.attributes.extend(KeyValue(key=key, value=value) for key, value in values)
    return True


def _set(attrs: dict[str, AnyValue], key: str, value: AnyValue) -> None:
    if key not in attrs:
        attrs[key] = value


def _string_value(text: str) -> AnyValue:
    return AnyValue(string_value=text)


def _rename(attrs: dict[str, AnyValue]) -> None:
    for old, new in _RENAMES.items():
        value = attrs.pop(old, None)
        if value is not None:
            _set(attrs, new, value)


def _provider(attrs: dict[str, AnyValue]) -> None:
    value = attrs.pop(sc.GEN_AI_SYSTEM, None)
    if value is None:
        return
    raw = any_value(value)
    if isinstance(raw, str) and raw:
        name = raw.strip().lower()
        _set(attrs, sc.GEN_AI_PROVIDER_NAME, _string_value(_PROVIDERS.get(name, name)))


def _operation(attrs: dict[str, AnyValue]) -> None:
    value = attrs.pop(LLM_REQUEST_TYPE, None)
    if value is None:
        return
    raw = any_value(value)
    if isinstance(raw, str) and raw:
        name = raw.strip().lower()
        _set(attrs, sc.GEN_AI_OPERATION_NAME, _string_value(_OPERATIONS.get(name, name)))


def _output_type(attrs: dict[str, AnyValue]) -> None:
    value = attrs.pop(_RESPONSE_FORMAT, None)
    if value is None:
        return
    raw = any_value(value)
    if isinstance(raw, str) and raw in _OUTPUT_TYPES:
        _set(attrs, sc.GEN_AI_OUTPUT_TYPE, _string_value(_OUTPUT_TYPES[raw]))


# ---------------------------------------------------------------------------------------------
# Messages


def _flat_messages(attrs: dict[str, AnyValue]) -> None:
    found: dict[str, dict[int, dict[str, Any]]] = {"prompt": {}, "completion": {}}
    for key in [k for k in attrs if k.startswith(("gen_ai.prompt.", "gen_ai.completion."))]:
        match = _FLAT_MESSAGE.match(key)
        if match is None:
            continue
        side, index, name = match.group(1), int(match.group(2)), match.group(3)
        found[side].setdefault(index, {})[name] = any_value(attrs.pop(key))
    for side, target, output in (
        ("prompt", sc.GEN_AI_INPUT_MESSAGES, False),
        ("completion", sc.GEN_AI_OUTPUT_MESSAGES, True),
    ):
        if found[side]:
            messages = [_flat_message(found[side][i], output) for i in sorted(found[side])]
            _set(attrs, target, _string_value(_dumps(messages)))


def _flat_message(fields: Mapping[str, Any], output: bool) -> dict[str, Any]:
    """One OpenLLMetry message (its ``gen_ai.prompt.N.*`` fields) in the parts schema."""
    role = _str(fields.get("role")) or ("assistant" if output else "user")
    parts: list[dict[str, Any]] = []
    content = fields.get("content")
    tool_call_id = _str(fields.get("tool_call_id"))
    if role == "tool" and tool_call_id:
        parts.append({"type": "tool_call_response", "id": tool_call_id, "response": content})
    elif content not in (None, ""):
        parts.extend(_content_parts(content))
    calls: dict[int, dict[str, Any]] = {}
    for name, value in fields.items():
        match = _TOOL_CALL_FIELD.match(name)
        if match:
            calls.setdefault(int(match.group(1)), {})[match.group(2)] = value
    for index in sorted(calls):
        parts.append(_tool_call_part(calls[index]))
    function_call = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("function_call.")}
    if function_call:
        parts.append(_tool_call_part(function_call))
    message: dict[str, Any] = {"role": role, "parts": parts}
    if output and fields.get("finish_reason"):
        message["finish_reason"] = _str(fields["finish_reason"])
    return message


def _tool_call_part(call: Mapping[str, Any]) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "tool_call", "name": _str(call.get("name"))}
    if call.get("id"):
        part["id"] = _str(call["id"])
    arguments = call.get("arguments")
    if arguments is not None:
        part["arguments"] = _maybe_json(arguments)
    return part


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """Content as text parts; OpenLLMetry encodes multimodal content as a JSON list of blocks."""
    if isinstance(content, str) and content.lstrip().startswith("["):
        blocks = _maybe_json(content)
        if isinstance(blocks, list) and all(isinstance(b, Mapping) for b in blocks):
            return [_block_part(b) for b in blocks]
    if isinstance(content, list) and all(isinstance(b, Mapping) for b in content):
        return [_block_part(b) for b in content]
    text = content if isinstance(content, str) else _dumps(content)
    return [{"type": "text", "content": text}]


def _block_part(block: Mapping[str, Any]) -> dict[str, Any]:
    kind = block.get("type")
    if kind in ("text", "input_text", "output_text") and isinstance(block.get("text"), str):
        return {"type": "text", "content": block["text"]}
    if kind == "image_url":
        image = block.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        return {"type": "uri", "modality": "image", "uri": _str(url)}
    return {"type": "text", "content": _dumps(block)}


def _event_messages(span: Span, attrs: dict[str, AnyValue]) -> None:
    """Semantic conventions 1.26: prompt and completion as span events holding OpenAI-style JSON."""
    for event in span.events:
        if event.name == EVENT_CONTENT_PROMPT:
            source, target, output = GEN_AI_PROMPT, sc.GEN_AI_INPUT_MESSAGES, False
        elif event.name == EVENT_CONTENT_COMPLETION:
            source, target, output = GEN_AI_COMPLETION, sc.GEN_AI_OUTPUT_MESSAGES, True
        else:
            continue
        if target in attrs:
            continue
        raw = next((any_value(kv.value) for kv in event.attributes if kv.key == source), None)
        messages = _openai_messages(raw, output)
        if messages:
            attrs[target] = _string_value(_dumps(messages))


def _openai_messages(raw: Any, output: bool) -> list[dict[str, Any]]:
    value = _maybe_json(raw) if isinstance(raw, str) else raw
    if isinstance(value, str):  # a bare prompt or completion text
        return [{"role": "assistant" if output else "user", "parts": [{"type": "text", "content": value}]}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        return []
    messages = []
    for item in value:
        if not isinstance(item, Mapping):
            continue
        nested = item.get("message")
        message: Mapping[str, Any] = nested if isinstance(nested, Mapping) else item
        messages.append(_openai_message(message, output, item.get("finish_reason")))
    return messages


def _openai_message(message: Mapping[str, Any], output: bool, finish_reason: Any) -> dict[str, Any]:
    role = _str(message.get("role")) or ("assistant" if output else "user")
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if role == "tool" and message.get("tool_call_id"):
        parts.append({"type": "tool_call_response", "id": _str(message["tool_call_id"]), "response": content})
    elif content not in (None, ""):
        parts.extend(_content_parts(content))
    for call in message.get("tool_calls") or []:
        if isinstance(call, Mapping):
            function = call.get("function")
            fields: Mapping[str, Any] = function if isinstance(function, Mapping) else call
            parts.append(_tool_call_part({**fields, "id": call.get("id")}))
    result: dict[str, Any] = {"role": role, "parts": parts}
    if output and finish_reason:
        result["finish_reason"] = _str(finish_reason)
    return result


def _flat_functions(attrs: dict[str, AnyValue]) -> None:
    functions: dict[int, dict[str, Any]] = {}
    for key in [k for k in attrs if k.startswith("llm.request.functions.")]:
        match = _FLAT_FUNCTION.match(key)
        if match:
            functions.setdefault(int(match.group(1)), {})[match.group(2)] = any_value(attrs.pop(key))
    if not functions:
        return
    definitions = []
    for index in sorted(functions):
        fields = functions[index]
        definition: dict[str, Any] = {"type": "function", "name": _str(fields.get("name"))}
        if fields.get("description"):
            definition["description"] = _str(fields["description"])
        if fields.get("parameters") is not None:
            definition["parameters"] = _maybe_json(fields["parameters"])
        definitions.append(definition)
    _set(attrs, sc.GEN_AI_TOOL_DEFINITIONS, _string_value(_dumps(definitions)))


def _maybe_json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _str(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)
