"""A local, dependency-free HTTP server that speaks the OpenAI API closely enough for the real client.

Point the real ``openai`` client at it with ``base_url=server.base_url``::

    with OpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

Endpoints: ``POST /v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings`` and ``/v1/completions``,
streaming and not. Payload shapes follow recorded exchanges with the real API. Replies are deterministic:
"You said: <last user text>" unless ``reply_text`` is set; token counts are derived from the text
(words and punctuation plus the real API's per-message overhead), so a streamed and a non-streamed call
of the same request report the same usage.

Faults can be scripted (``fail_next``, ``delay_next``, ``cut_stream_next``, ``error_event_next``) and a
model whose name contains "does-not-exist" or "non-existent" gets the real API's ``model_not_found`` error.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import string
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

__all__ = ["OpenAIServer", "RecordedRequest", "count_tokens"]

JSON = dict[str, Any]
_T = TypeVar("_T")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None when absent or not valid JSON


# --------------------------------------------------------------------------- tokens, ids, models

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_PIECE_RE = re.compile(r"\s*\S+|\s+")
_ALNUM = string.ascii_letters + string.digits
_IMAGE_TOKENS = 85  # what the real API charges for a low-detail image part


def count_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: one token per word or punctuation mark."""
    return len(_TOKEN_RE.findall(text))


def _truncate_tokens(text: str, limit: int) -> str:
    """The prefix of ``text`` holding its first ``limit`` tokens."""
    if limit <= 0:
        return ""
    for position, match in enumerate(_TOKEN_RE.finditer(text), start=1):
        if position == limit:
            return text[: match.end()]
    return text


def _alnum(length: int) -> str:
    return "".join(random.choices(_ALNUM, k=length))


def _hex_id(prefix: str) -> str:
    return prefix + os.urandom(25).hex()


# Requested alias -> the dated snapshot the real API reports back.
_DATED_MODELS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4": "gpt-4-0613",
    "gpt-4-turbo": "gpt-4-turbo-2024-04-09",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "gpt-3.5-turbo-instruct": "gpt-3.5-turbo-instruct:20230824-v2",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "o1": "o1-2024-12-17",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
    "gpt-5.4": "gpt-5.4-2026-03-05",
}
_NO_FINGERPRINT = frozenset({"gpt-4-0613"})  # the real API sends system_fingerprint null for it
_REASONING_MODEL_RE = re.compile(r"(o\d|gpt-5)")
_REASONING_TOKENS = {"none": 0, "minimal": 0, "low": 16, "medium": 64, "high": 256, "xhigh": 512}
_EMBEDDING_DIMENSIONS = {"text-embedding-3-large": 3072}
_DEFAULT_EMBEDDING_DIMENSIONS = 1536


def _dated_model(model: str) -> str:
    return _DATED_MODELS.get(model, model)


def _is_missing_model(model: str) -> bool:
    return "does-not-exist" in model or "non-existent" in model


def _is_reasoning_model(model: str) -> bool:
    return _REASONING_MODEL_RE.match(model) is not None


@lru_cache(maxsize=256)
def _fingerprint(dated_model: str) -> str | None:
    if dated_model in _NO_FINGERPRINT:
        return None
    return "fp_" + hashlib.sha256(dated_model.encode()).hexdigest()[:10]


def _reasoning_tokens(model: str, effort: Any) -> int:
    if not _is_reasoning_model(model):
        return 0
    return _REASONING_TOKENS.get(effort if isinstance(effort, str) else "medium", 64)


def _cached_tokens(prompt_tokens: int) -> int:
    # The real API caches prompts of 1024+ tokens in 128-token steps; report such a prefix as a cache hit.
    return ((prompt_tokens - 1) // 128) * 128 if prompt_tokens > 1024 else 0


def _service_tier(requested: Any) -> str:
    return requested if requested in ("flex", "priority", "scale") else "default"


# --------------------------------------------------------------------------- errors


class _ApiError(Exception):
    """An error the server answers with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers


# status -> (type, code, message) used by fail_next when the caller gives none.
_FAILURE_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Request not allowed."),
    404: ("invalid_request_error", "not_found", "The requested resource was not found."),
    409: ("invalid_request_error", "conflict", "The request conflicted with another request."),
    422: ("invalid_request_error", None, "Unprocessable request."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


_INVALID_JSON_MESSAGE = "We could not parse the JSON body of your request. The API expects a JSON payload."


def _missing_model_error(model: str, endpoint: str) -> _ApiError:
    # The Responses API answers 400 with param "model"; the older endpoints answer 404 (as recorded).
    if endpoint == "responses":
        message = f"The requested model '{model}' does not exist."
        return _ApiError(400, message, param="model", code="model_not_found")
    message = f"The model `{model}` does not exist or you do not have access to it."
    return _ApiError(404, message, code="model_not_found")


def _missing_parameter(name: str) -> _ApiError:
    message = f"Missing required parameter: '{name}'."
    return _ApiError(400, message, param=name, code="missing_required_parameter")


def _require_model(body: JSON, endpoint: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "you must provide a model parameter")
    if _is_missing_model(model):
        raise _missing_model_error(model, endpoint)
    return model


def _choice_count(body: JSON) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
        raise _ApiError(400, f"{n!r} is not valid for 'n': expected an integer from 1 to 128.", param="n")
    return n


# --------------------------------------------------------------------------- request content


def _as_dict(value: Any) -> JSON:
    return value if isinstance(value, dict) else {}


def _first_given(body: JSON, *keys: str, default: Any = None) -> Any:
    """The first of ``keys`` present with a non-null value (clients may send explicit nulls)."""
    return next((body[key] for key in keys if body.get(key) is not None), default)


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _content_text(content: Any) -> str:
    """The text of a message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(text for text in texts if isinstance(text, str))
    return ""


def _content_tokens(content: Any) -> int:
    tokens = count_tokens(_content_text(content))
    if isinstance(content, list):
        tokens += _IMAGE_TOKENS * sum(
            1 for part in content if isinstance(part, dict) and "image" in str(part.get("type"))
        )
    return tokens


def _tool_definition_tokens(tools: Any) -> int:
    return count_tokens(json.dumps(tools)) if tools else 0


def _chat_prompt_tokens(messages: list[Any], tools: Any) -> int:
    # Same bookkeeping as the real API: 3 tokens per message plus role, 3 to prime the reply.
    total = 3 + _tool_definition_tokens(tools)
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += 3 + count_tokens(str(message.get("role", ""))) + _content_tokens(message.get("content"))
        if message.get("name"):
            total += 1 + count_tokens(str(message["name"]))
        for call in message.get("tool_calls") or []:
            function = _as_dict(_as_dict(call).get("function"))
            total += (
                3
                + count_tokens(str(function.get("name", "")))
                + count_tokens(str(function.get("arguments", "")))
            )
    return total


def _responses_input_tokens(instructions: Any, items: list[JSON], tools: Any) -> int:
    total = 3 + _tool_definition_tokens(tools)
    if isinstance(instructions, str) and instructions:
        total += 4 + count_tokens(instructions)
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            total += 3 + count_tokens(str(item.get("role", ""))) + _content_tokens(item.get("content"))
        elif kind == "function_call":
            total += (
                3 + count_tokens(str(item.get("name", ""))) + count_tokens(str(item.get("arguments", "")))
            )
        elif kind == "function_call_output":
            total += 3 + count_tokens(_content_text(item.get("output")))
        else:
            total += 3
    return total


def _responses_items(raw_input: Any) -> list[JSON]:
    """Responses ``input`` as a list of items (a bare string is one user message)."""
    if isinstance(raw_input, str):
        return [{"type": "message", "role": "user", "content": raw_input}]
    if isinstance(raw_input, list):
        return [item for item in raw_input if isinstance(item, dict)]
    return []


def _echo_reply(user_text: str) -> str:
    return f"You said: {user_text}" if user_text else "Hello! How can I help you today?"


def _tool_result_reply(results: list[str]) -> str:
    return "Tool results: " + "; ".join(results)


# --------------------------------------------------------------------------- schema examples

_STRING_HINTS = (
    ("location", "San Francisco, CA"),
    ("city", "San Francisco"),
    ("country", "United States"),
    ("email", "user@example.com"),
    ("url", "https://example.com"),
    ("date", "2024-01-01"),
    ("timezone", "UTC"),
    ("time", "12:00"),
    ("unit", "celsius"),
    ("language", "en"),
    ("name", "Alice"),
)
_STRING_FORMATS = {
    "date-time": "2024-01-01T12:00:00Z",
    "date": "2024-01-01",
    "time": "12:00:00",
    "email": "user@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _example_string(name: str, schema: JSON) -> str:
    if schema.get("format") in _STRING_FORMATS:
        return _STRING_FORMATS[schema["format"]]
    lowered = name.lower()
    for hint, value in _STRING_HINTS:
        if hint in lowered:
            return value
    return "example"


def _example_number(schema: JSON, default: float) -> float:
    minimum = schema.get("minimum", schema.get("exclusiveMinimum"))
    return max(default, minimum) if isinstance(minimum, int | float) else default


def _schema_type(schema: JSON) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None and "properties" in schema:
        return "object"
    return kind if isinstance(kind, str) else None


def _resolve_ref(schema: JSON, root: JSON) -> JSON:
    target: Any = root
    for part in str(schema["$ref"]).lstrip("#/").split("/"):
        target = target.get(part, {}) if isinstance(target, dict) else {}
    return target if isinstance(target, dict) else {}


def _example_value(schema: Any, name: str, root: JSON, depth: int = 0) -> Any:
    """A simple value satisfying ``schema`` (required object properties only)."""
    if not isinstance(schema, dict) or depth > 12:
        return None
    if "$ref" in schema:
        return _example_value(_resolve_ref(schema, root), name, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = [o for o in schema.get(combinator) or [] if isinstance(o, dict) and o.get("type") != "null"]
        if options:
            return _example_value(options[0], name, root, depth + 1)
    kind = _schema_type(schema)
    if kind == "object":
        properties = _as_dict(schema.get("properties"))
        required = [key for key in schema.get("required") or [] if isinstance(key, str)]
        return {key: _example_value(properties.get(key), key, root, depth + 1) for key in required}
    if kind == "array":
        return [_example_value(schema.get("items"), name, root, depth + 1)]
    if kind == "integer":
        return int(_example_number(schema, 1))
    if kind == "number":
        return float(_example_number(schema, 1.0))
    if kind == "boolean":
        return True
    if kind == "string":
        return _example_string(name, schema)
    return None


def _example_json(schema: Any) -> str:
    root = schema if isinstance(schema, dict) else {}
    value = _example_value(root, "", root)
    return json.dumps(value if value is not None else {}, separators=(",", ":"))


# --------------------------------------------------------------------------- tool calls


@dataclass(frozen=True)
class _ToolCall:
    call_id: str
    name: str
    arguments: str

    @property
    def tokens(self) -> int:
        return 3 + count_tokens(self.name) + count_tokens(self.arguments)


def _function_tools(tools: Any) -> list[JSON]:
    """Function definitions as ``{"name", "parameters"}`` from chat or Responses tool lists."""
    functions = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        definition = _as_dict(tool.get("function")) or tool
        if isinstance(definition.get("name"), str):
            functions.append({"name": definition["name"], "parameters": definition.get("parameters") or {}})
    return functions


def _plan_tool_calls(
    functions: list[JSON], tool_choice: Any, parallel: Any, last_role: str | None
) -> list[JSON]:
    """Which functions to call: like the real model, tools are called in answer to a user turn."""
    if not functions or tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        forced = tool_choice.get("name") or _as_dict(tool_choice.get("function")).get("name")
        if forced:
            return [f for f in functions if f["name"] == forced][:1]
    if tool_choice != "required" and last_role != "user":
        return []
    return functions if parallel is not False and len(functions) > 1 else functions[:1]


def _make_tool_calls(functions: list[JSON]) -> list[_ToolCall]:
    return [_ToolCall("call_" + _alnum(24), f["name"], _example_json(f["parameters"])) for f in functions]


def _fragments(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _split_text(text: str, chunks: int) -> list[str]:
    """Stream pieces: one per word by default, or exactly ``chunks`` near-equal slices."""
    if chunks <= 0:
        return _PIECE_RE.findall(text)
    size, extra = divmod(len(text), chunks)
    pieces, position = [], 0
    for index in range(chunks):
        step = size + (1 if index < extra else 0)
        pieces.append(text[position : position + step])
        position += step
    return pieces


def _apply_stop(text: str, stop: Any) -> str:
    sequences = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    cut = min((text.find(s) for s in sequences if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def _limit_text(text: str, limit: Any) -> tuple[str, bool]:
    """Truncate to a token budget; the flag says whether the budget cut the text."""
    if isinstance(limit, int) and not isinstance(limit, bool) and count_tokens(text) > limit:
        return _truncate_tokens(text, limit), True
    return text, False


# --------------------------------------------------------------------------- SSE framing


@dataclass
class _Stream:
    """A streamed answer: its SSE frames, the terminator, and how to frame a mid-stream error."""

    frames: list[bytes]
    done: bytes | None
    error_frame: Callable[[int], bytes]


_DONE_FRAME = b"data: [DONE]\n\n"
_STREAM_ERROR = {
    "message": "The server had an error while processing your request. Sorry about that!",
    "type": "server_error",
    "param": None,
    "code": "server_error",
}


def _wants_obfuscation(body: JSON) -> bool:
    return _as_dict(body.get("stream_options")).get("include_obfuscation", True) is not False


def _obfuscation(delta: str) -> str:
    # Real streams pad each event with random characters so sizes leak less; the value is meaningless.
    return _alnum(max(1, 16 - len(delta)))


def _data_frame(payload: JSON) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _event_frame(payload: JSON) -> bytes:
    return f"event: {payload['type']}\n".encode() + _data_frame(payload)


def _chat_error_frame(_sequence_number: int) -> bytes:
    # Legacy-endpoint error shape: the client raises APIError on any payload with an "error" key.
    return b"event: error\n" + _data_frame({"error": _STREAM_ERROR})


def _responses_error_frame(sequence_number: int) -> bytes:
    # The live API nests the details under "error" (the reference documents them flat); send both.
    payload = {
        "type": "error",
        "code": _STREAM_ERROR["code"],
        "message": _STREAM_ERROR["message"],
        "param": None,
        "error": _STREAM_ERROR,
        "sequence_number": sequence_number,
    }
    return _event_frame(payload)


# --------------------------------------------------------------------------- chat completions


@dataclass(frozen=True)
class _Settings:
    """Per-request snapshot of the server's reply settings."""

    reply_text: str | None
    stream_chunks: int


@dataclass
class _Choice:
    index: int
    text: str | None
    tool_calls: list[_ToolCall]
    finish_reason: str

    @property
    def tokens(self) -> int:
        if self.tool_calls:
            return sum(call.tokens for call in self.tool_calls)
        return count_tokens(self.text or "")


def _chat_reply_text(body: JSON, messages: list[Any], settings: _Settings) -> str:
    if settings.reply_text is not None:
        return settings.reply_text
    response_format = _as_dict(body.get("response_format"))
    if response_format.get("type") == "json_schema":
        return _example_json(_as_dict(response_format.get("json_schema")).get("schema"))
    trailing_tools = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        trailing_tools.append(_content_text(message.get("content")))
    if trailing_tools:
        return _tool_result_reply(trailing_tools[::-1])
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    text = _echo_reply(_content_text(users[-1].get("content")) if users else "")
    if response_format.get("type") == "json_object":
        return json.dumps({"response": text})
    return text


def _chat_choices(body: JSON, messages: list[Any], settings: _Settings) -> list[_Choice]:
    n = _choice_count(body)
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    functions = _plan_tool_calls(
        _function_tools(body.get("tools")),
        body.get("tool_choice"),
        body.get("parallel_tool_calls"),
        last.get("role"),
    )
    if functions:
        return [_Choice(i, None, _make_tool_calls(functions), "tool_calls") for i in range(n)]
    text = _apply_stop(_chat_reply_text(body, messages, settings), body.get("stop"))
    text, cut = _limit_text(text, _first_given(body, "max_completion_tokens", "max_tokens"))
    return [_Choice(i, text, [], "length" if cut else "stop") for i in range(n)]


@dataclass
class _ChatCompletion:
    id: str
    created: int
    model: str
    service_tier: str
    fingerprint: str | None
    choices: list[_Choice]
    usage: JSON

    def header(self, obj: str) -> JSON:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def trailer(self) -> JSON:
        return {"service_tier": self.service_tier, "system_fingerprint": self.fingerprint}


def _chat_usage(prompt: int, completion: int, reasoning: int) -> JSON:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": _cached_tokens(prompt), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _plan_chat(body: JSON, settings: _Settings) -> _ChatCompletion:
    model = _require_model(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _missing_parameter("messages")
    choices = _chat_choices(body, messages, settings)
    reasoning = _reasoning_tokens(model, body.get("reasoning_effort")) * len(choices)
    completion = sum(choice.tokens for choice in choices) + reasoning
    dated = _dated_model(model)
    return _ChatCompletion(
        id="chatcmpl-" + _alnum(29),
        created=int(time.time()),
        model=dated,
        service_tier=_service_tier(body.get("service_tier")),
        fingerprint=_fingerprint(dated),
        choices=choices,
        usage=_chat_usage(_chat_prompt_tokens(messages, body.get("tools")), completion, reasoning),
    )


def _chat_message(choice: _Choice) -> JSON:
    if not choice.tool_calls:
        return {"role": "assistant", "content": choice.text, "refusal": None, "annotations": []}
    calls = [
        {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in choice.tool_calls
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls, "refusal": None, "annotations": []}


def _chat_json(plan: _ChatCompletion) -> JSON:
    choices = [
        {"index": c.index, "message": _chat_message(c), "logprobs": None, "finish_reason": c.finish_reason}
        for c in plan.choices
    ]
    return {**plan.header("chat.completion"), "choices": choices, "usage": plan.usage, **plan.trailer()}


def _chat_deltas(choice: _Choice, chunks: int) -> list[JSON]:
    """The deltas of one choice before its finish chunk, split like the real API splits them."""
    if not choice.tool_calls:
        first: JSON = {"role": "assistant", "content": "", "refusal": None}
        return [first, *({"content": piece} for piece in _split_text(choice.text or "", chunks))]
    deltas: list[JSON] = [{"role": "assistant", "content": None}]
    for index, call in enumerate(choice.tool_calls):
        opening = {"index": index, "id": call.call_id, "type": "function"}
        deltas.append({"tool_calls": [{**opening, "function": {"name": call.name, "arguments": ""}}]})
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": part}}]}
            for part in _fragments(call.arguments)
        )
    return deltas


def _chat_stream(plan: _ChatCompletion, body: JSON, settings: _Settings) -> _Stream:
    include_usage = bool(_as_dict(body.get("stream_options")).get("include_usage"))
    obfuscate = _wants_obfuscation(body)

    def chunk(choices: list[JSON], usage: JSON | None = None) -> bytes:
        payload = {**plan.header("chat.completion.chunk"), **plan.trailer(), "choices": choices}
        if include_usage:
            payload["usage"] = usage  # null on every chunk but the last, as the real API sends
        if obfuscate:
            payload["obfuscation"] = _obfuscation(
                str(choices[0]["delta"].get("content") or "") if choices else ""
            )
        return _data_frame(payload)

    def entry(index: int, delta: JSON, finish_reason: str | None = None) -> JSON:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    per_choice = [_chat_deltas(choice, settings.stream_chunks) for choice in plan.choices]
    frames = [
        chunk([entry(choice.index, deltas[step])])
        for step in range(max(map(len, per_choice)))
        for choice, deltas in zip(plan.choices, per_choice, strict=True)
        if step < len(deltas)
    ]
    frames.extend(chunk([entry(c.index, {}, c.finish_reason)]) for c in plan.choices)
    if include_usage:
        frames.append(chunk([], plan.usage))
    return _Stream(frames, _DONE_FRAME, _chat_error_frame)


# --------------------------------------------------------------------------- responses


@dataclass
class _ResponsePlan:
    body: JSON
    id: str
    created_at: int
    model: str
    items: list[JSON]  # completed output items
    status: str
    incomplete_reason: str | None
    usage: JSON


def _responses_reply_text(body: JSON, items: list[JSON], settings: _Settings) -> str:
    if settings.reply_text is not None:
        return settings.reply_text
    text_format = _as_dict(_as_dict(body.get("text")).get("format"))
    if text_format.get("type") == "json_schema":
        return _example_json(text_format.get("schema"))
    outputs = []
    for item in reversed(items):
        if item.get("type") != "function_call_output":
            break
        outputs.append(_content_text(item.get("output")))
    if outputs:
        return _tool_result_reply(outputs[::-1])
    users = [i for i in items if i.get("type", "message") == "message" and i.get("role") == "user"]
    text = _echo_reply(_content_text(users[-1].get("content")) if users else "")
    if text_format.get("type") == "json_object":
        return json.dumps({"response": text})
    return text


def _message_item(text: str, status: str, reasoning: bool) -> JSON:
    item: JSON = {
        "id": _hex_id("msg_"),
        "type": "message",
        "status": status,
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
    }
    if reasoning:
        item["phase"] = "final_answer"
    item["role"] = "assistant"
    return item


def _function_call_item(call: _ToolCall) -> JSON:
    return {
        "id": _hex_id("fc_"),
        "type": "function_call",
        "status": "completed",
        "arguments": call.arguments,
        "call_id": call.call_id,
        "name": call.name,
    }


def _responses_usage(input_tokens: int, output_tokens: int, reasoning: int) -> JSON:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": _cached_tokens(input_tokens)},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def _plan_response(body: JSON, settings: _Settings) -> _ResponsePlan:
    model = _require_model(body, "responses")
    items = _responses_items(body.get("input"))
    last = items[-1] if items else {}
    last_role = last.get("role") if last.get("type", "message") == "message" else last.get("type")
    reasoning = _reasoning_tokens(model, _as_dict(body.get("reasoning")).get("effort"))
    output: list[JSON] = [{"id": _hex_id("rs_"), "type": "reasoning", "summary": []}] if reasoning else []
    functions = _plan_tool_calls(
        _function_tools(body.get("tools")),
        body.get("tool_choice"),
        body.get("parallel_tool_calls"),
        last_role,
    )
    status, reason = "completed", None
    if functions:
        calls = _make_tool_calls(functions)
        output.extend(_function_call_item(call) for call in calls)
        visible = sum(call.tokens for call in calls)
    else:
        budget = body.get("max_output_tokens")
        budget = budget - reasoning if isinstance(budget, int) and not isinstance(budget, bool) else None
        text, cut = _limit_text(_responses_reply_text(body, items, settings), budget)
        if cut:
            status, reason = "incomplete", "max_output_tokens"
        output.append(_message_item(text, status, bool(reasoning)))
        visible = count_tokens(text)
    input_tokens = _responses_input_tokens(body.get("instructions"), items, body.get("tools"))
    return _ResponsePlan(
        body=body,
        id=_hex_id("resp_"),
        created_at=int(time.time()),
        model=_dated_model(model),
        items=output,
        status=status,
        incomplete_reason=reason,
        usage=_responses_usage(input_tokens, visible + reasoning, reasoning),
    )


def _echo_tools(tools: Any) -> list[JSON]:
    echoed = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type") == "function":
            echoed.append(
                {
                    "type": "function",
                    "description": tool.get("description"),
                    "name": tool.get("name"),
                    "parameters": tool.get("parameters"),
                    "strict": tool.get("strict", True),
                }
            )
        elif isinstance(tool, dict):
            echoed.append(tool)
    return echoed


def _echo_text(text: Any) -> JSON:
    text = text if isinstance(text, dict) else {}
    return {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity", "medium")}


def _response_object(plan: _ResponsePlan, *, final: bool, billing: bool) -> JSON:
    """The ``response`` object; ``final`` False gives the in-progress snapshot that streams start with."""
    body = plan.body
    reasoning = _as_dict(body.get("reasoning"))
    effort = reasoning.get("effort", "medium" if _is_reasoning_model(plan.model) else None)
    incomplete = {"reason": plan.incomplete_reason} if final and plan.incomplete_reason else None
    response: JSON = {
        "id": plan.id,
        "object": "response",
        "created_at": plan.created_at,
        "status": plan.status if final else "in_progress",
        "background": bool(body.get("background", False)),
    }
    if billing:
        response["billing"] = {"payer": "developer"}
    response.update(
        {
            "completed_at": int(time.time()) if final else None,
            "error": None,
            "frequency_penalty": _number(body.get("frequency_penalty"), 0.0),
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "model": plan.model,
            "output": plan.items if final else [],
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "presence_penalty": _number(body.get("presence_penalty"), 0.0),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "prompt_cache_retention": body.get("prompt_cache_retention") or "in_memory",
            "reasoning": {"effort": effort, "summary": reasoning.get("summary")},
            "safety_identifier": body.get("safety_identifier"),
            "service_tier": _service_tier(body.get("service_tier")),
            "store": body.get("store") is not False,
            "temperature": _number(body.get("temperature"), 1.0),
            "text": _echo_text(body.get("text")),
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": _echo_tools(body.get("tools")),
            "top_logprobs": body.get("top_logprobs") or 0,
            "top_p": _number(body.get("top_p"), 1.0),
            "truncation": body.get("truncation") or "disabled",
            "usage": plan.usage if final else None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }
    )
    return response


class _EventSequence:
    """Builds Responses stream events, numbering them as the real API does."""

    def __init__(self, obfuscate: bool) -> None:
        self.frames: list[bytes] = []
        self._obfuscate = obfuscate

    def emit(self, kind: str, **fields: Any) -> None:
        payload = {"type": kind, **fields, "sequence_number": len(self.frames)}
        self.frames.append(_event_frame(payload))

    def obfuscation(self, delta: str) -> JSON:
        return {"obfuscation": _obfuscation(delta)} if self._obfuscate else {}


def _stream_message(events: _EventSequence, item: JSON, index: int, chunks: int) -> None:
    text = item["content"][0]["text"]
    part = {"type": "output_text", "annotations": [], "logprobs": []}
    where = {"item_id": item["id"], "output_index": index}
    events.emit(
        "response.output_item.added",
        item={**item, "status": "in_progress", "content": []},
        output_index=index,
    )
    events.emit("response.content_part.added", content_index=0, part={**part, "text": ""}, **where)
    for piece in _split_text(text, chunks):
        extra = events.obfuscation(piece)
        events.emit("response.output_text.delta", content_index=0, delta=piece, logprobs=[], **extra, **where)
    events.emit("response.output_text.done", content_index=0, logprobs=[], text=text, **where)
    events.emit("response.content_part.done", content_index=0, part={**part, "text": text}, **where)
    events.emit("response.output_item.done", item=item, output_index=index)


def _stream_function_call(events: _EventSequence, item: JSON, index: int) -> None:
    where = {"item_id": item["id"], "output_index": index}
    events.emit(
        "response.output_item.added",
        item={**item, "status": "in_progress", "arguments": ""},
        output_index=index,
    )
    for piece in _fragments(item["arguments"]):
        events.emit(
            "response.function_call_arguments.delta", delta=piece, **events.obfuscation(piece), **where
        )
    events.emit(
        "response.function_call_arguments.done", arguments=item["arguments"], name=item["name"], **where
    )
    events.emit("response.output_item.done", item=item, output_index=index)


def _responses_stream(plan: _ResponsePlan, settings: _Settings) -> _Stream:
    events = _EventSequence(obfuscate=_wants_obfuscation(plan.body))
    events.emit("response.created", response=_response_object(plan, final=False, billing=False))
    events.emit("response.in_progress", response=_response_object(plan, final=False, billing=False))
    for index, item in enumerate(plan.items):
        if item["type"] == "message":
            _stream_message(events, item, index, settings.stream_chunks)
        elif item["type"] == "function_call":
            _stream_function_call(events, item, index)
        else:
            events.emit("response.output_item.added", item=item, output_index=index)
            events.emit("response.output_item.done", item=item, output_index=index)
    final = "response.completed" if plan.status == "completed" else "response.incomplete"
    events.emit(final, response=_response_object(plan, final=True, billing=False))
    return _Stream(events.frames, None, _responses_error_frame)


# --------------------------------------------------------------------------- embeddings


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, str | list) for x in raw):
        return list(raw)
    raise _ApiError(400, "'input' must be a string, a list of strings, or token arrays.", param="input")


@lru_cache(maxsize=2048)
def _embedding(key: str, full_dimensions: int, dimensions: int) -> tuple[tuple[float, ...], str]:
    """A unit vector derived from the input text; shortened vectors are renormalised prefixes, like
    the real text-embedding-3 models."""
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(full_dimensions)][:dimensions]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in vector))
    # Floats come from the float32 bytes so float and base64 answers agree exactly.
    return struct.unpack(f"<{dimensions}f", packed), base64.b64encode(packed).decode()


def _embedding_dimensions(model: str, requested: Any) -> tuple[int, int]:
    full = _EMBEDDING_DIMENSIONS.get(model, _DEFAULT_EMBEDDING_DIMENSIONS)
    if requested is None:
        return full, full
    if model.startswith("text-embedding-ada"):
        raise _ApiError(400, "This model does not support specifying dimensions.", param="dimensions")
    if not isinstance(requested, int) or isinstance(requested, bool) or not 1 <= requested <= full:
        raise _ApiError(400, f"Invalid value for 'dimensions' = {requested}.", param="dimensions")
    return full, requested


def _embeddings_json(body: JSON) -> JSON:
    model = _require_model(body, "embeddings")
    if "input" not in body:
        raise _missing_parameter("input")
    inputs = _embedding_inputs(body["input"])
    full, dimensions = _embedding_dimensions(model, body.get("dimensions"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _ApiError(400, f"Invalid value for 'encoding_format' = {encoding}.", param="encoding_format")
    data, tokens = [], 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else json.dumps(item)
        tokens += count_tokens(item) if isinstance(item, str) else len(item)
        floats, encoded = _embedding(f"{model}\0{text}", full, dimensions)
        data.append(
            {"object": "embedding", "index": index, "embedding": encoded if encoding == "base64" else floats}
        )
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# --------------------------------------------------------------------------- legacy completions

_LEGACY_DEFAULT_MAX_TOKENS = 16  # the real endpoint's default


@dataclass
class _LegacyPlan:
    id: str
    created: int
    model: str
    choices: list[tuple[int, str, str]]  # index, text, finish_reason
    usage: JSON


def _prompts(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        return list(raw)
    if isinstance(raw, list) and raw:
        return [json.dumps(raw)]  # token arrays: no text to echo back
    raise _missing_parameter("prompt")


def _plan_completion(body: JSON, settings: _Settings) -> _LegacyPlan:
    model = _require_model(body, "completions")
    prompts = _prompts(body.get("prompt"))
    n = _choice_count(body)
    limit = _first_given(body, "max_tokens", default=_LEGACY_DEFAULT_MAX_TOKENS)
    choices: list[tuple[int, str, str]] = []
    completion = 0
    for prompt in prompts:
        reply = settings.reply_text if settings.reply_text is not None else _echo_reply(prompt)
        text, cut = _limit_text(_apply_stop(reply, body.get("stop")), limit)
        completion += count_tokens(text) * n
        shown = prompt + text if body.get("echo") else text
        choices.extend((len(choices), shown, "length" if cut else "stop") for _ in range(n))
    prompt_tokens = sum(count_tokens(p) for p in prompts)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    return _LegacyPlan("cmpl-" + _alnum(29), int(time.time()), _dated_model(model), choices, usage)


def _completion_json(plan: _LegacyPlan) -> JSON:
    choices = [
        {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
        for index, text, finish in plan.choices
    ]
    head = {"id": plan.id, "object": "text_completion", "created": plan.created, "model": plan.model}
    return {**head, "choices": choices, "usage": plan.usage}


def _completion_stream(plan: _LegacyPlan, body: JSON, settings: _Settings) -> _Stream:
    include_usage = bool(_as_dict(body.get("stream_options")).get("include_usage"))
    head = {"id": plan.id, "object": "text_completion", "created": plan.created}

    def chunk(choices: list[JSON], usage: JSON | None = None) -> bytes:
        payload = {**head, "choices": choices, "model": plan.model}
        if include_usage:
            payload["usage"] = usage
        return _data_frame(payload)

    frames = [
        chunk([{"text": piece, "index": index, "logprobs": None, "finish_reason": None}])
        for index, text, _ in plan.choices
        for piece in _split_text(text, settings.stream_chunks)
    ]
    frames.extend(
        chunk([{"text": "", "index": index, "logprobs": None, "finish_reason": finish}])
        for index, _, finish in plan.choices
    )
    if include_usage:
        frames.append(chunk([], plan.usage))
    return _Stream(frames, _DONE_FRAME, _chat_error_frame)


# --------------------------------------------------------------------------- routing


def _route_chat(body: JSON, settings: _Settings) -> JSON | _Stream:
    plan = _plan_chat(body, settings)
    return _chat_stream(plan, body, settings) if body.get("stream") else _chat_json(plan)


def _route_responses(body: JSON, settings: _Settings) -> JSON | _Stream:
    plan = _plan_response(body, settings)
    if body.get("stream"):
        return _responses_stream(plan, settings)
    return _response_object(plan, final=True, billing=True)


def _route_embeddings(body: JSON, settings: _Settings) -> JSON | _Stream:
    return _embeddings_json(body)


def _route_completions(body: JSON, settings: _Settings) -> JSON | _Stream:
    plan = _plan_completion(body, settings)
    return _completion_stream(plan, body, settings) if body.get("stream") else _completion_json(plan)


def _azure_path(path: str) -> tuple[str, str | None]:
    """Azure OpenAI's ``/openai/deployments/<name>/<endpoint>`` as ``/v1/<endpoint>``, model = name."""
    prefix = "/openai/deployments/"
    if not path.startswith(prefix):
        return path, None
    deployment, _, rest = path[len(prefix) :].partition("/")
    return "/v1/" + rest, deployment


_ROUTES: dict[str, Callable[[JSON, _Settings], JSON | _Stream]] = {
    "/v1/chat/completions": _route_chat,
    "/v1/responses": _route_responses,
    "/v1/embeddings": _route_embeddings,
    "/v1/completions": _route_completions,
}


# --------------------------------------------------------------------------- scripted faults


@dataclass(frozen=True)
class _Failure:
    status: int
    code: str | None
    message: str | None
    retry_after: float | None

    def error(self) -> _ApiError:
        type_, default_code, default_message = _FAILURE_DEFAULTS.get(
            self.status,
            ("server_error" if self.status >= 500 else "invalid_request_error", None, "Request failed."),
        )
        headers: tuple[tuple[str, str], ...] = ()
        if self.retry_after is not None:
            headers = (("retry-after", f"{self.retry_after:g}"),)
        code = self.code if self.code is not None else default_code
        return _ApiError(
            self.status, self.message or default_message, type_=type_, code=code, headers=headers
        )


@dataclass(frozen=True)
class _StreamFault:
    kind: str  # "cut" or "error"
    after: int


class _Script(Generic[_T]):
    """A thread-safe queue of faults, each applying to the next ``times`` eligible requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: deque[list[Any]] = deque()

    def push(self, item: _T, times: int) -> None:
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._entries.append([item, times])

    def take(self) -> _T | None:
        if not self._entries:  # cheap unlocked check: the common case has nothing scripted
            return None
        with self._lock:
            if not self._entries:
                return None
            entry = self._entries[0]
            entry[1] -= 1
            if entry[1] == 0:
                self._entries.popleft()
            item: _T = entry[0]
            return item

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# --------------------------------------------------------------------------- HTTP plumbing


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    length = handler.headers.get("content-length")
    if length:
        return handler.rfile.read(int(length))
    if "chunked" not in (handler.headers.get("transfer-encoding") or "").lower():
        return b""
    parts: list[bytes] = []
    while True:
        size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # skip trailers
            return b"".join(parts)
        parts.append(handler.rfile.read(size))
        handler.rfile.readline()


def _parse_json(raw: bytes) -> tuple[Any, bool]:
    if not raw.strip():
        return None, True
    try:
        return json.loads(raw), True
    except ValueError:
        return None, False


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _chunk(frame: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(frame), frame)


class _Exchange:
    """Writes one response, with the headers the client reads, in as few syscalls as possible."""

    def __init__(self, handler: _Handler, started: float) -> None:
        self.handler = handler
        self.started = started

    def _head(self, status: int, content_type: str, extra: tuple[tuple[str, str], ...]) -> list[str]:
        elapsed_ms = int((time.perf_counter() - self.started) * 1000)
        lines = [
            f"HTTP/1.1 {status} {_reason_phrase(status)}",
            f"content-type: {content_type}",
            f"x-request-id: req_{os.urandom(16).hex()}",
            f"openai-processing-ms: {elapsed_ms}",
            "openai-version: 2020-10-01",
            f"date: {self.handler.date_time_string()}",
        ]
        lines.extend(f"{name}: {value}" for name, value in extra)
        if self.handler.close_connection:
            lines.append("connection: close")
        return lines

    def send_json(self, status: int, payload: Any, extra: tuple[tuple[str, str], ...] = ()) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        lines = self._head(status, "application/json", extra)
        lines.append(f"content-length: {len(body)}")
        self.handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def send_error(self, error: _ApiError) -> None:
        self.send_json(error.status, error.body, error.headers)

    def send_stream(self, stream: _Stream, fault: _StreamFault | None) -> None:
        lines = self._head(200, "text/event-stream; charset=utf-8", ())
        lines.append("transfer-encoding: chunked")
        write = self.handler.wfile.write
        write(("\r\n".join(lines) + "\r\n\r\n").encode())
        frames = stream.frames if fault is None else stream.frames[: fault.after]
        for frame in frames:
            write(_chunk(frame))
        if fault is not None and fault.kind == "cut":
            # End the connection mid-body: no [DONE], no terminating chunk.
            self.handler.close_connection = True
            self.handler.connection.shutdown(socket.SHUT_RDWR)
            return
        last = b""
        if fault is not None:
            last = _chunk(stream.error_frame(len(frames)))
        elif stream.done is not None:
            last = _chunk(stream.done)
        write(last + b"0\r\n\r\n")  # one write: the client sees the body end together with [DONE]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: OpenAIServer) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Register the connection before its thread starts, so stop() always knows every live one.
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address), daemon=True)
        self.app._connection_opened(request, thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self.app._connection_closed(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, cut streams) are expected; anything else is a bug.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Small responses written in one go; no Nagle delay waiting for the client's ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            self.close_connection = True  # the client went away mid-exchange

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        return  # no per-request logging: benchmarks make thousands of calls

    def do_POST(self) -> None:
        self.server.app._serve(self)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST


# --------------------------------------------------------------------------- the server


class OpenAIServer:
    """An OpenAI-compatible HTTP server on a daemon thread; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.requests: list[RecordedRequest] = []
        self.stream_chunks: int = 0
        self.reply_text: str | None = None
        self._lock = threading.Lock()
        self._failures: _Script[_Failure] = _Script()
        self._delays: _Script[float] = _Script()
        self._stream_faults: _Script[_StreamFault] = _Script()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}

    # -- lifecycle

    def start(self) -> OpenAIServer:
        if self._httpd is not None:
            raise RuntimeError("OpenAIServer is already running")
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="OpenAIServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()  # wakes handlers sleeping in delay_next
        httpd.shutdown()
        with self._lock:
            open_connections = dict(self._connections)
        for connection in open_connections:
            # Unblocks handler threads waiting on idle keep-alive connections.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        thread.join(timeout=5)
        for handler_thread in open_connections.values():
            handler_thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            return self._requested_port
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- scripting

    def fail_next(
        self,
        status: int,
        *,
        code: str | None = None,
        message: str | None = None,
        times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` requests with this HTTP error and an OpenAI-shaped body."""
        self._failures.push(_Failure(status, code, message, retry_after), times)

    def delay_next(self, seconds: float, times: int = 1) -> None:
        """Sleep ``seconds`` before answering the next ``times`` requests (``stop()`` cuts it short)."""
        self._delays.push(seconds, times)

    def cut_stream_next(self, after_chunks: int, times: int = 1) -> None:
        """Next ``times`` streamed answers: send ``after_chunks`` events, then drop the connection."""
        self._stream_faults.push(_StreamFault("cut", after_chunks), times)

    def error_event_next(self, after_chunks: int, times: int = 1) -> None:
        """Next ``times`` streamed answers: send ``after_chunks`` events, then an SSE error event."""
        self._stream_faults.push(_StreamFault("error", after_chunks), times)

    def reset(self) -> None:
        """Forget recorded requests and scripted faults; restore default reply settings."""
        with self._lock:
            self.requests.clear()
        for script in (self._failures, self._delays, self._stream_faults):
            script.clear()
        self.reply_text = None
        self.stream_chunks = 0

    # -- request handling (called on handler threads)

    def _connection_opened(self, connection: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections[connection] = thread

    def _connection_closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)

    def _serve(self, handler: _Handler) -> None:
        started = time.perf_counter()
        raw = _read_body(handler)
        path = urlsplit(handler.path).path
        body, valid = _parse_json(raw)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            self.requests.append(RecordedRequest(handler.command, path, headers, body))
        exchange = _Exchange(handler, started)
        try:
            self._answer(exchange, handler.command, path, body, valid)
        except _ApiError as error:
            exchange.send_error(error)
        except OSError:
            raise
        except Exception as error:  # a server bug should reach the test as a 500, not vanish
            exchange.send_error(_ApiError(500, f"OpenAIServer failed: {error!r}", type_="server_error"))

    def _answer(self, exchange: _Exchange, method: str, path: str, body: Any, valid: bool) -> None:
        delay = self._delays.take()
        if delay:
            self._stopping.wait(delay)
        failure = self._failures.take()
        if failure is not None:
            raise failure.error()
        path, deployment = _azure_path(path)
        route = _ROUTES.get(path)
        if route is None:
            raise _ApiError(404, f"Invalid URL ({method} {path})")
        if deployment is not None and isinstance(body, dict):
            body.setdefault("model", deployment)
        if method != "POST":
            raise _ApiError(405, f"Invalid method for URL ({method} {path})")
        if not valid or not isinstance(body, dict | None):
            raise _ApiError(400, _INVALID_JSON_MESSAGE)
        result = route(body or {}, _Settings(self.reply_text, self.stream_chunks))
        if isinstance(result, _Stream):
            exchange.send_stream(result, self._stream_faults.take())
        else:
            exchange.send_json(200, result)
