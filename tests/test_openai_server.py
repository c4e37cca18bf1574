"""Tests of the OpenAI-compatible test server: fidelity to real recordings, and the real client against it."""

from __future__ import annotations

import base64
import contextlib
import http.client
import importlib
import json
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from openai.types.responses import FunctionToolParam, ResponseCompletedEvent
from pydantic import BaseModel

from genai_mlflow.testing.openai_server import OpenAIServer, count_tokens

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say this is a test"}]
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "unit"],
        },
    },
}
TIME_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
RESPONSES_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_current_weather",
    "parameters": dict(WEATHER_TOOL["function"].get("parameters") or {}),
    "strict": False,
}


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_server(server: OpenAIServer) -> Iterator[None]:
    server.reset()
    yield
    server.reset()


@pytest.fixture
def client(server: OpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0) as sync_client:
        yield sync_client


@pytest.fixture
async def aclient(server: OpenAIServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="test-key", max_retries=0
    ) as async_client:
        yield async_client


def post_raw(
    server: OpenAIServer, path: str, body: Any, method: str = "POST"
) -> tuple[int, dict[str, str], str]:
    """One raw HTTP exchange, bypassing the client, to see exactly what the server sends."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request(method, path, payload, {"content-type": "application/json"})
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, response.read().decode()
    finally:
        connection.close()


# --------------------------------------------------------------------------- recordings

RECORDINGS = Path(
    os.environ.get("OPENAI_RECORDINGS_DIR", Path(__file__).resolve().parents[2] / "shared/recorded-openai")
)
FIDELITY_PATHS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses")


@dataclass(frozen=True)
class Recorded:
    """One request/response pair from a VCR cassette of the real API."""

    cassette: str
    index: int
    path: str
    request: Any
    status: int
    content_type: str
    body: str

    @property
    def name(self) -> str:
        return f"{self.cassette}[{self.index}]"

    @property
    def is_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")


def _header(headers: dict[str, Any], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return str(value[0] if isinstance(value, list) else value)
    return ""


def load_recordings() -> list[Recorded]:
    if not RECORDINGS.is_dir():
        return []
    try:
        yaml = importlib.import_module("yaml")  # optional: PyYAML is only needed to read recordings
    except ImportError:
        return []
    found = []
    for cassette in sorted(RECORDINGS.glob("*.yaml")):
        for index, interaction in enumerate(yaml.safe_load(cassette.read_text())["interactions"]):
            request, response = interaction["request"], interaction["response"]
            found.append(
                Recorded(
                    cassette=cassette.stem,
                    index=index,
                    path=request["uri"].split("api.openai.com", 1)[-1],
                    request=json.loads(request["body"]) if request["body"] else None,
                    status=response["status"]["code"],
                    content_type=_header(response["headers"], "content-type"),
                    body=response["body"]["string"],
                )
            )
    return found


ALL_RECORDINGS = load_recordings()
SUCCESSES = [r for r in ALL_RECORDINGS if r.status == 200 and r.path in FIDELITY_PATHS]
ERRORS = [r for r in ALL_RECORDINGS if r.status >= 400]


def recording_params(recordings: list[Recorded]) -> list[Any]:
    if not recordings:  # keep one parameter so the test reports a skip instead of vanishing
        return [pytest.param(None, id="no-recordings")]
    return [pytest.param(r, id=r.name) for r in recordings]


def require(recorded: Recorded | None) -> Recorded:
    if recorded is None:
        pytest.skip(f"no recordings of the real API at {RECORDINGS} (or PyYAML missing)")
    return recorded


# --------------------------------------------------------------------------- structure comparison

# Keys that carry a kind rather than data: their values must match, not just their presence.
KIND_KEYS = frozenset({"object", "type", "role", "finish_reason", "status"})
# Keys the current API sends that the 2024 recordings lack (the 2025 recordings have them), keyed by
# (the recorded object's "object" type or the end of its path, key name).
ALLOWED_EXTRA: dict[tuple[str, str], str] = {
    ("chat.completion", "service_tier"): "on every completion since 2025; 2024 recordings lack it",
    ("chat.completion.chunk", "service_tier"): "on every chunk since 2025; 2024 recordings lack it",
    ("chat.completion.chunk", "obfuscation"): "stream padding added in 2025; 2024 recordings lack it",
    (".message", "annotations"): "on every chat message since 2025; 2024 recordings lack it",
}


def allowed_extra(recorded: dict[str, Any], where: str) -> set[str]:
    kind = str(recorded.get("object"))
    return {key for (scope, key) in ALLOWED_EXTRA if scope == kind or where.endswith(scope)}


def _category(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def shape_diff(recorded: Any, ours: Any, where: str = "$") -> list[str]:
    """Structural differences: key sets (recursively), list element shapes (first element), value
    categories, and values of kind keys. Other values may differ; a null on either side matches anything."""
    if recorded is None or ours is None:
        return []
    if _category(recorded) != _category(ours):
        return [f"{where}: recorded a {_category(recorded)}, we sent a {_category(ours)}"]
    if isinstance(recorded, list):
        if bool(recorded) != bool(ours):
            return [f"{where}: recorded {len(recorded)} items, we sent {len(ours)}"]
        return shape_diff(recorded[0], ours[0], f"{where}[0]") if recorded else []
    if not isinstance(recorded, dict):
        return []
    extra = ours.keys() - recorded.keys() - allowed_extra(recorded, where)
    problems = [f"{where}: missing key {key!r}" for key in sorted(recorded.keys() - ours.keys())]
    problems += [f"{where}: extra key {key!r}" for key in sorted(extra)]
    for key in sorted(recorded.keys() & ours.keys()):
        if key in KIND_KEYS and recorded[key] != ours[key]:
            problems.append(f"{where}.{key}: recorded {recorded[key]!r}, we sent {ours[key]!r}")
        problems += shape_diff(recorded[key], ours[key], f"{where}.{key}")
    return problems


def parse_sse(text: str) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) per SSE event; data "[DONE]" stays a string."""
    events: list[tuple[str | None, Any]] = []
    event: str | None = None
    data: list[str] = []
    for line in text.splitlines():
        if not line:
            if data:
                joined = "\n".join(data)
                events.append((event, joined if joined == "[DONE]" else json.loads(joined)))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        joined = "\n".join(data)
        events.append((event, joined if joined == "[DONE]" else json.loads(joined)))
    return events


def chunk_kind(chunk: dict[str, Any]) -> str:
    if not chunk["choices"]:
        return "usage"
    choice = chunk["choices"][0]
    delta = choice["delta"]
    if choice["finish_reason"]:
        return "finish"
    if "role" in delta:
        return "role"
    if delta.get("tool_calls"):
        return "tool_call.start" if "id" in delta["tool_calls"][0] else "tool_call.arguments"
    return "content"


def _first_occurrences(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def chat_stream_outline(events: list[tuple[str | None, Any]]) -> dict[str, Any]:
    """What must match between two chat streams whatever their text: each choice's sequence of chunk
    kinds (in first-seen order, so the number of words or tool calls may differ), where the usage chunk
    is, and the [DONE] terminator."""
    chunks = [data for _, data in events if data != "[DONE]"]
    per_choice: dict[int, list[str]] = {}
    for chunk in chunks:
        if chunk["choices"]:
            per_choice.setdefault(chunk["choices"][0]["index"], []).append(chunk_kind(chunk))
    return {
        "choices": {index: _first_occurrences(kinds) for index, kinds in sorted(per_choice.items())},
        "usage chunk last": bool(chunks) and chunk_kind(chunks[-1]) == "usage",
        "usage chunks": sum(chunk_kind(c) == "usage" for c in chunks),
        "ends with [DONE]": bool(events) and events[-1][1] == "[DONE]",
        "objects": sorted({c["object"] for c in chunks}),
    }


def chat_stream_diff(recorded: list[tuple[str | None, Any]], ours: list[tuple[str | None, Any]]) -> list[str]:
    problems = []
    expected, got = chat_stream_outline(recorded), chat_stream_outline(ours)
    for key in expected:
        if expected[key] != got[key]:
            problems.append(f"stream {key}: recorded {expected[key]!r}, we sent {got[key]!r}")
    ours_by_kind = {chunk_kind(d): d for _, d in reversed(ours) if d != "[DONE]"}
    for _, data in recorded:
        if data != "[DONE]" and chunk_kind(data) in ours_by_kind:
            kind = chunk_kind(data)
            problems += shape_diff(data, ours_by_kind.pop(kind), f"<{kind} chunk>")
    return problems


def _collapse(items: list[str]) -> list[str]:
    return [item for i, item in enumerate(items) if i == 0 or items[i - 1] != item]


def responses_stream_diff(
    recorded: list[tuple[str | None, Any]], ours: list[tuple[str | None, Any]]
) -> list[str]:
    """Same event sequence (runs of deltas collapsed), `event:` lines naming each event's type,
    consecutive sequence numbers, and the same shape for the first event of each type."""
    problems = []
    expected = _collapse([data["type"] for _, data in recorded])
    got = _collapse([data["type"] for _, data in ours])
    if expected != got:
        problems.append(f"event sequence: recorded {expected}, we sent {got}")
    problems += [
        f"event line {name!r} for a {data['type']!r} event" for name, data in ours if name != data["type"]
    ]
    numbers = [data["sequence_number"] for _, data in ours]
    if numbers != list(range(len(ours))):
        problems.append(f"sequence numbers not consecutive from 0: {numbers}")
    ours_by_type = {data["type"]: data for _, data in reversed(ours)}
    for _, data in recorded:
        if data["type"] in ours_by_type:
            problems += shape_diff(data, ours_by_type.pop(data["type"]), f"<{data['type']}>")
    return problems


def readable(recorded: Recorded, problems: list[str]) -> str:
    return f"{recorded.name} ({recorded.path}) differs from the real API:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- fidelity to recordings


def test_recordings_cover_every_endpoint_and_mode() -> None:
    if not ALL_RECORDINGS:
        pytest.skip(f"no recordings of the real API at {RECORDINGS} (or PyYAML missing)")
    covered = {(r.path, r.is_stream) for r in SUCCESSES}
    assert covered >= {
        ("/v1/chat/completions", False),
        ("/v1/chat/completions", True),
        ("/v1/embeddings", False),
        ("/v1/responses", False),
        ("/v1/responses", True),
    }


@pytest.mark.parametrize("recorded", recording_params(SUCCESSES))
def test_success_has_recorded_structure(server: OpenAIServer, recorded: Recorded | None) -> None:
    recorded = require(recorded)
    status, headers, text = post_raw(server, recorded.path, recorded.request)
    assert status == 200, text
    assert headers["content-type"].split(";")[0] == recorded.content_type.split(";")[0]
    if not recorded.is_stream:
        problems = shape_diff(json.loads(recorded.body), json.loads(text))
    elif recorded.path == "/v1/responses":
        problems = responses_stream_diff(parse_sse(recorded.body), parse_sse(text))
    else:
        problems = chat_stream_diff(parse_sse(recorded.body), parse_sse(text))
    assert not problems, readable(recorded, problems)


@pytest.mark.parametrize("recorded", recording_params(ERRORS))
def test_error_has_recorded_status_and_body(server: OpenAIServer, recorded: Recorded | None) -> None:
    recorded = require(recorded)
    status, headers, text = post_raw(server, recorded.path, recorded.request)
    expected, got = json.loads(recorded.body)["error"], json.loads(text)["error"]
    problems = [f"status: recorded {recorded.status}, we sent {status}"] if status != recorded.status else []
    problems += shape_diff({"error": expected}, {"error": got})
    for key in ("type", "param", "code"):
        if expected[key] != got[key]:
            problems.append(f"error.{key}: recorded {expected[key]!r}, we sent {got[key]!r}")
    assert not problems, readable(recorded, problems)
    assert headers["content-type"].startswith("application/json")


# --------------------------------------------------------------------------- chat completions (sync)


def test_chat_plain(client: openai.OpenAI, server: OpenAIServer) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.choices[0].message.content == "You said: Say this is a test"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.system_fingerprint and completion.system_fingerprint.startswith("fp_")
    assert completion.service_tier == "default"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 8, 20)
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details and usage.completion_tokens_details.reasoning_tokens == 0
    recorded = server.requests[-1]
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.body["messages"] == USER
    assert recorded.headers["authorization"] == "Bearer test-key"


def _collect_stream(stream: Any) -> tuple[dict[int, str], Any, list[Any]]:
    texts: dict[int, str] = {}
    usage = None
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, usage, chunks


def test_chat_stream_matches_non_streaming(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage, chunks = _collect_stream(stream)
    assert texts == {0: plain.choices[0].message.content}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and usage == plain.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_chat_stream_without_usage(client: openai.OpenAI, server: OpenAIServer) -> None:
    stream = client.chat.completions.create(model="gpt-4", messages=USER, stream=True)
    texts, usage, chunks = _collect_stream(stream)
    assert usage is None and texts == {0: "You said: Say this is a test"}
    assert chunks[0].model == "gpt-4-0613" and chunks[0].system_fingerprint is None


def test_chat_n_choices(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=USER, n=2)
    assert [choice.index for choice in completion.choices] == [0, 1]
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage, chunks = _collect_stream(stream)
    assert texts == {0: "You said: Say this is a test", 1: "You said: Say this is a test"}
    assert usage == completion.usage and usage.completion_tokens == 16
    indices = [chunk.choices[0].index for chunk in chunks if chunk.choices]
    assert indices[:4] == [0, 1, 0, 1]  # interleaved, like the real API


def test_chat_tool_calls(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        tools=[WEATHER_TOOL],
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_current_weather"
    assert json.loads(call.function.arguments) == {"location": "San Francisco, CA", "unit": "celsius"}


def test_chat_parallel_tool_calls_and_tool_turn(client: openai.OpenAI) -> None:
    tools: Any = [WEATHER_TOOL, TIME_TOOL]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=USER, tools=tools)
    calls = [c for c in first.choices[0].message.tool_calls or [] if c.type == "function"]
    assert [c.function.name for c in calls] == ["get_current_weather", "get_time"]
    single = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        tools=tools,
        parallel_tool_calls=False,
    )
    assert len(single.choices[0].message.tool_calls or []) == 1
    turn: Any = [
        *USER,
        first.choices[0].message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": f"result {i}"} for i, c in enumerate(calls)),
    ]
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=turn, tools=tools)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "Tool results: result 0; result 1"


def test_chat_stream_tool_calls(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        tools=[WEATHER_TOOL, TIME_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    arguments: dict[int, str] = {}
    names: dict[int, str] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                assert call.function is not None
                arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
                if call.function.name:
                    names[call.index] = call.function.name
    assert finish == "tool_calls"
    assert names == {0: "get_current_weather", 1: "get_time"}
    assert json.loads(arguments[0])["location"] == "San Francisco, CA"
    assert json.loads(arguments[1]) == {"timezone": "UTC"}


def test_chat_parse_with_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model="gpt-4o-mini", messages=USER, response_format=Person)
    assert completion.choices[0].message.parsed == Person(name="Alice", age=1, tags=["example"])


def test_chat_stream_helper(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="gpt-4o-mini",
        messages=USER,
        response_format=Person,
        stream_options={"include_usage": True},
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == final.choices[0].message.content
    assert final.choices[0].message.parsed == Person(name="Alice", age=1, tags=["example"])
    assert final.usage is not None and final.usage.total_tokens > 0


def test_chat_length_limit_and_stop(client: openai.OpenAI) -> None:
    cut = client.chat.completions.create(model="gpt-4o-mini", messages=USER, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "You said:"
    assert cut.usage is not None and cut.usage.completion_tokens == 3
    stopped = client.chat.completions.create(model="gpt-4o-mini", messages=USER, stop=[" this"])
    assert stopped.choices[0].message.content == "You said: Say"


def test_reasoning_model_reports_reasoning_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="o3-mini", messages=USER, reasoning_effort="low")
    assert completion.model == "o3-mini-2025-01-31"
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 16
    assert usage.completion_tokens == 16 + 8


def test_long_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    long_text = " ".join(["word"] * 1500)
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": long_text}]
    )
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 1408  # 128-token steps, below the prompt size


def test_reply_text_and_stream_chunks(client: openai.OpenAI, server: OpenAIServer) -> None:
    server.reply_text = "A fixed reply."
    server.stream_chunks = 200
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    _, _, chunks = _collect_stream(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content is not None]
    assert len(content_chunks) == 1 + 200  # the role chunk carries content "" too
    assert "".join(c.choices[0].delta.content for c in content_chunks) == "A fixed reply."
    server.reply_text = "x" * 1000
    events = client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 200 and "".join(deltas) == "x" * 1000


# --------------------------------------------------------------------------- responses (sync)


def test_responses_create(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="gpt-4o-mini", input="Say this is a test", instructions="You are a helpful assistant."
    )
    assert response.object == "response" and response.status == "completed"
    assert response.id.startswith("resp_") and response.model == "gpt-4o-mini-2024-07-18"
    assert response.output_text == "You said: Say this is a test"
    assert response.instructions == "You are a helpful assistant." and response.incomplete_details is None
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (22, 8, 30)
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_responses_stream_event_sequence(client: openai.OpenAI) -> None:
    plain = client.responses.create(model="gpt-4o-mini", input="Say this is a test")
    events = list(client.responses.create(model="gpt-4o-mini", input="Say this is a test", stream=True))
    kinds = _collapse([event.type for event in events])
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert isinstance(events[-1], ResponseCompletedEvent)
    completed = events[-1].response
    assert completed.output_text == plain.output_text and completed.usage == plain.usage


def test_responses_stream_helper_and_parse(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gpt-4o-mini", input="hi", text_format=Person) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_parsed == Person(name="Alice", age=1, tags=["example"])
    parsed = client.responses.parse(model="gpt-4o-mini", input="hi", text_format=Person)
    assert parsed.output_parsed == final.output_parsed


def test_responses_function_calls(client: openai.OpenAI) -> None:
    tools: Any = [RESPONSES_TOOL]
    response = client.responses.create(model="gpt-4o-mini", input="Weather?", tools=tools)
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_current_weather"
    assert call.call_id.startswith("call_") and json.loads(call.arguments)["unit"] == "celsius"
    events = list(client.responses.create(model="gpt-4o-mini", input="Weather?", tools=tools, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(deltas) == json.loads(call.arguments)
    follow_up = client.responses.create(
        model="gpt-4o-mini",
        input=[
            {"role": "user", "content": "Weather?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=tools,
    )
    assert follow_up.output_text == "Tool results: sunny"


def test_responses_reasoning_and_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gpt-5", input="hi", reasoning={"effort": "high"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 256
    cut = client.responses.create(model="gpt-4o-mini", input="Say this is a test", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.output_text == "You said"


# --------------------------------------------------------------------------- embeddings, legacy completions


def test_embeddings_base64_float_and_dimensions(client: openai.OpenAI, server: OpenAIServer) -> None:
    default = client.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert server.requests[-1].body["encoding_format"] == "base64"  # the client asks for base64 and decodes
    floats = client.embeddings.create(
        model="text-embedding-3-small", input="hello world", encoding_format="float"
    )
    assert default.data[0].embedding == floats.data[0].embedding
    assert len(floats.data[0].embedding) == 1536
    assert abs(sum(v * v for v in floats.data[0].embedding) - 1.0) < 1e-5
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2
    short = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"], dimensions=64)
    assert [(d.index, len(d.embedding)) for d in short.data] == [(0, 64), (1, 64), (2, 64)]
    assert short.data[0].embedding != short.data[1].embedding


def test_embeddings_raw_base64_round_trips(server: OpenAIServer) -> None:
    body = {"model": "text-embedding-3-small", "input": "x", "dimensions": 4}
    _, _, as_float = post_raw(server, "/v1/embeddings", {**body, "encoding_format": "float"})
    _, _, as_base64 = post_raw(server, "/v1/embeddings", {**body, "encoding_format": "base64"})
    vector = json.loads(as_float)["data"][0]["embedding"]
    decoded = struct.unpack("<4f", base64.b64decode(json.loads(as_base64)["data"][0]["embedding"]))
    assert list(decoded) == vector


def test_legacy_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test")
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == "gpt-3.5-turbo-instruct:20230824-v2"
    assert completion.choices[0].text == "You said: Say this is a test"
    assert completion.usage is not None and completion.usage.prompt_tokens == count_tokens(
        "Say this is a test"
    )
    stream = client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Say this is a test",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage == completion.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# --------------------------------------------------------------------------- errors and scripted faults


def test_missing_model_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as chat_error:
        client.chat.completions.create(model="does-not-exist", messages=USER)
    assert chat_error.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="non-existent-embedding-model", input="x")
    with pytest.raises(openai.BadRequestError) as responses_error:  # the Responses API answers 400
        client.responses.create(model="does-not-exist", input="x")
    assert responses_error.value.code == "model_not_found" and responses_error.value.param == "model"


@pytest.mark.parametrize(
    ("status", "exception"),
    [(404, openai.NotFoundError), (500, openai.InternalServerError), (429, openai.RateLimitError)],
)
def test_fail_next_raises_matching_exception(
    client: openai.OpenAI, server: OpenAIServer, status: int, exception: type[openai.APIStatusError]
) -> None:
    server.fail_next(status, code="scripted", message="scripted failure")
    with pytest.raises(exception) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert raised.value.status_code == status and raised.value.code == "scripted"
    assert raised.value.message.endswith("scripted failure")
    assert raised.value.request_id and raised.value.request_id.startswith("req_")
    client.chat.completions.create(model="gpt-4o-mini", messages=USER)  # only once


def test_fail_next_times_and_retry_after(server: OpenAIServer) -> None:
    server.fail_next(429, times=2, retry_after=0.01)
    status, headers, text = post_raw(
        server, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER}
    )
    assert status == 429 and headers["retry-after"] == "0.01"
    assert json.loads(text)["error"].keys() == {"message", "type", "param", "code"}
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=1) as retrying:
        # the second scripted failure is retried after retry-after, then the call succeeds
        retrying.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert len(server.requests) == 3


def test_delay_next_triggers_client_timeout(client: openai.OpenAI, server: OpenAIServer) -> None:
    server.delay_next(1.0)
    started = time.perf_counter()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert time.perf_counter() - started < 0.9
    client.chat.completions.create(model="gpt-4o-mini", messages=USER)  # no delay left


def test_cut_stream_next_breaks_iteration(client: openai.OpenAI, server: OpenAIServer) -> None:
    server.cut_stream_next(after_chunks=2)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True):
            received.append(chunk)
    assert len(received) == 2
    server.cut_stream_next(after_chunks=3)
    with pytest.raises(openai.APIConnectionError):
        list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert len(list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))) > 3  # once only


def test_stream_faults_skip_non_streaming_requests(client: openai.OpenAI, server: OpenAIServer) -> None:
    server.cut_stream_next(after_chunks=1)
    client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))


def test_error_event_next_raises_api_error(client: openai.OpenAI, server: OpenAIServer) -> None:
    server.error_event_next(after_chunks=2, times=3)
    received = []
    with pytest.raises(openai.APIError, match="error while processing"):
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True):
            received.append(chunk)
    assert len(received) == 2
    with pytest.raises(openai.APIError):
        list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    with pytest.raises(openai.APIError), client.responses.stream(model="gpt-4o-mini", input="hi") as stream:
        list(stream)


def test_error_event_frames(server: OpenAIServer) -> None:
    server.error_event_next(after_chunks=1, times=2)
    _, _, chat = post_raw(
        server, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER, "stream": True}
    )
    name, data = parse_sse(chat)[-1]
    assert name == "error" and data["error"].keys() == {"message", "type", "param", "code"}
    _, _, responses = post_raw(
        server, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    )
    name, data = parse_sse(responses)[-1]
    assert name == "error" and data["type"] == "error" and data["sequence_number"] == 1
    assert data["message"] == data["error"]["message"]  # documented flat fields and the live API's nesting


# --------------------------------------------------------------------------- HTTP behaviour


def test_unknown_path_wrong_method_and_bad_json(server: OpenAIServer) -> None:
    status, headers, text = post_raw(server, "/v1/nothing-here", {})
    assert status == 404 and json.loads(text)["error"]["message"] == "Invalid URL (POST /v1/nothing-here)"
    assert headers["x-request-id"].startswith("req_") and int(headers["openai-processing-ms"]) >= 0
    status, _, text = post_raw(server, "/v1/chat/completions", b"", method="GET")
    assert status == 405
    status, headers, text = post_raw(server, "/v1/chat/completions", b"{not json")
    error = json.loads(text)["error"]
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error.keys() == {"message", "type", "param", "code"}
    assert headers["content-type"] == "application/json"
    status, _, text = post_raw(server, "/v1/chat/completions", {"model": "gpt-4o-mini"})
    assert status == 400 and json.loads(text)["error"]["param"] == "messages"
    assert server.requests[-2].body is None  # invalid JSON is recorded as None


def test_keep_alive_across_plain_and_streamed_responses(server: OpenAIServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    sockets = []
    try:
        for stream in (False, True, False, True, False):
            body = json.dumps({"model": "gpt-4o-mini", "messages": USER, "stream": stream})
            connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            response = connection.getresponse()
            text = response.read().decode()
            assert response.status == 200
            assert (response.getheader("transfer-encoding") == "chunked") is stream
            assert text.endswith("data: [DONE]\n\n") is stream
            sockets.append(connection.sock)
    finally:
        connection.close()
    assert all(sock is sockets[0] for sock in sockets)  # http.client reconnects if the server closed


def test_client_reuses_one_connection() -> None:
    with OpenAIServer() as own_server, openai.OpenAI(base_url=own_server.base_url, api_key="k") as own_client:
        own_client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        list(own_client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))
        own_client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        assert len(own_server._connections) == 1  # a private look: one accepted connection, kept alive


def test_concurrent_clients(server: OpenAIServer) -> None:
    failures: list[BaseException] = []

    def work() -> None:
        try:
            with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as own:
                for _ in range(10):
                    own.chat.completions.create(model="gpt-4o-mini", messages=USER)
                    list(own.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))
        except BaseException as error:
            failures.append(error)

    workers = [threading.Thread(target=work) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures
    assert len(server.requests) == 8 * 10 * 2


def test_stop_with_open_keep_alive_and_pending_delay() -> None:
    before = set(threading.enumerate())
    server = OpenAIServer().start()
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    idle.request("POST", "/v1/embeddings", json.dumps({"model": "text-embedding-3-small", "input": "x"}))
    idle.getresponse().read()  # the connection stays open, its handler thread waits for more
    server.delay_next(30)

    def delayed_request() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):  # stop() drops it
            post_raw(server, "/v1/embeddings", {})

    sleeper = threading.Thread(target=delayed_request, daemon=True)
    sleeper.start()
    time.sleep(0.05)
    started = time.perf_counter()
    server.stop()
    assert time.perf_counter() - started < 2
    sleeper.join(timeout=2)
    idle.close()
    assert set(threading.enumerate()) - before == set()
    server.stop()  # idempotent


def test_restart_and_base_url() -> None:
    server = OpenAIServer()
    assert server.port == 0
    with server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        with pytest.raises(RuntimeError):
            server.start()
    with server:
        assert post_raw(server, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})[0] == 200


# --------------------------------------------------------------------------- async client


async def test_async_chat_plain_stream_and_tools(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.chat.completions.create(model="gpt-4o-mini", messages=USER, n=2)
    assert [c.message.content for c in completion.choices] == ["You said: Say this is a test"] * 2
    stream = await aclient.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {0: "You said: Say this is a test", 1: "You said: Say this is a test"}
    assert usage == completion.usage
    tool_stream = await aclient.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        tools=[WEATHER_TOOL],
        stream=True,
    )
    finish = [c.choices[0].finish_reason async for c in tool_stream if c.choices][-1]
    assert finish == "tool_calls"


async def test_async_parse_and_stream_helper(aclient: openai.AsyncOpenAI) -> None:
    parsed = await aclient.chat.completions.parse(model="gpt-4o-mini", messages=USER, response_format=Person)
    assert parsed.choices[0].message.parsed == Person(name="Alice", age=1, tags=["example"])
    async with aclient.chat.completions.stream(
        model="gpt-4o-mini",
        messages=USER,
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "You said: Say this is a test"


async def test_async_responses(aclient: openai.AsyncOpenAI) -> None:
    response = await aclient.responses.create(model="gpt-4o-mini", input="hi")
    assert response.output_text == "You said: hi"
    async with aclient.responses.stream(model="gpt-4o-mini", input="hi", text_format=Person) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_response()
    assert final.output_parsed == Person(name="Alice", age=1, tags=["example"])
    parsed = await aclient.responses.parse(model="gpt-4o-mini", input="hi", text_format=Person)
    assert parsed.output_parsed == final.output_parsed


async def test_async_embeddings_and_completions(aclient: openai.AsyncOpenAI) -> None:
    embedded = await aclient.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], dimensions=32
    )
    assert [len(d.embedding) for d in embedded.data] == [32, 32]
    floats = await aclient.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], dimensions=32, encoding_format="float"
    )
    assert floats.data[1].embedding == embedded.data[1].embedding
    completion = await aclient.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert completion.choices[0].text == "You said: hi"


async def test_async_faults(aclient: openai.AsyncOpenAI, server: OpenAIServer) -> None:
    for status, exception in ((404, openai.NotFoundError), (500, openai.InternalServerError)):
        server.fail_next(status)
        with pytest.raises(exception):
            await aclient.chat.completions.create(model="gpt-4o-mini", messages=USER)
    server.fail_next(429, retry_after=1)
    with pytest.raises(openai.RateLimitError) as limited:
        await aclient.responses.create(model="gpt-4o-mini", input="hi")
    assert limited.value.response.headers["retry-after"] == "1"
    server.delay_next(1.0)
    with pytest.raises(openai.APITimeoutError):
        await aclient.with_options(timeout=0.2).chat.completions.create(model="gpt-4o-mini", messages=USER)
    server.cut_stream_next(after_chunks=1)
    stream = await aclient.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass
    server.error_event_next(after_chunks=1)
    events = await aclient.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    with pytest.raises(openai.APIError):
        async for _ in events:
            pass
