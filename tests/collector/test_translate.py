"""Older GenAI attribute styles to the current conventions (``genai_mlflow.collector.legacy``)."""

from __future__ import annotations

import json
import os
import time

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from genai_mlflow.collector import legacy
from genai_mlflow.exporter import records
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.records import LocalTrace, span_attributes
from tests.collector.otlp_data import kv, llm_span


def _span(attributes: dict) -> Span:
    start = time.time_ns()
    span = Span(
        trace_id=os.urandom(16),
        span_id=os.urandom(8),
        name="openai.chat",
        start_time_unix_nano=start,
        end_time_unix_nano=start + 10**9,
    )
    span.attributes.extend(kv(k, v) for k, v in attributes.items())
    return span


def test_openllmetry_flattened_messages_become_current_attributes():
    span = _span(
        {
            "gen_ai.system": "OpenAI",
            "llm.request.type": "chat",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.prompt_tokens": 14,
            "gen_ai.usage.completion_tokens": 4,
            "gen_ai.prompt.0.role": "system",
            "gen_ai.prompt.0.content": "be brief",
            "gen_ai.prompt.1.role": "user",
            "gen_ai.prompt.1.content": "What is 2+2?",
            "gen_ai.prompt.2.role": "assistant",
            "gen_ai.prompt.2.tool_calls.0.id": "call_1",
            "gen_ai.prompt.2.tool_calls.0.name": "add",
            "gen_ai.prompt.2.tool_calls.0.arguments": '{"a": 2, "b": 2}',
            "gen_ai.prompt.3.role": "tool",
            "gen_ai.prompt.3.tool_call_id": "call_1",
            "gen_ai.prompt.3.content": "4",
            "gen_ai.completion.0.role": "assistant",
            "gen_ai.completion.0.content": "4",
            "gen_ai.completion.0.finish_reason": "stop",
            "llm.request.functions.0.name": "add",
            "llm.request.functions.0.description": "adds",
            "llm.request.functions.0.parameters": '{"type": "object"}',
        }
    )
    assert legacy.translate(span)
    attrs = span_attributes(span)
    assert not [k for k in attrs if k.startswith(("gen_ai.prompt.", "gen_ai.completion.", "llm."))]
    assert "gen_ai.system" not in attrs and "gen_ai.usage.prompt_tokens" not in attrs
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.usage.input_tokens"] == 14
    assert attrs["gen_ai.usage.output_tokens"] == 4
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "be brief"}]},
        {"role": "user", "parts": [{"type": "text", "content": "What is 2+2?"}]},
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "name": "add", "id": "call_1", "arguments": {"a": 2, "b": 2}}],
        },
        {"role": "tool", "parts": [{"type": "tool_call_response", "id": "call_1", "response": "4"}]},
    ]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "4"}], "finish_reason": "stop"}
    ]
    assert json.loads(attrs["gen_ai.tool.definitions"]) == [
        {"type": "function", "name": "add", "description": "adds", "parameters": {"type": "object"}}
    ]


def test_translated_spans_are_read_by_the_records_layer():
    span = _span(
        {
            "gen_ai.system": "openai",
            "llm.request.type": "chat",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.prompt_tokens": 1000,
            "gen_ai.usage.completion_tokens": 100,
            "gen_ai.prompt.0.content": "hello there",
            "gen_ai.completion.0.content": "hi",
            "gen_ai.agent.name": "old_style",
        }
    )
    assert not records.is_genai(span)  # before: no gen_ai.operation.name
    legacy.translate(span)
    trace = LocalTrace(span.trace_id, [span])
    run = records.run_record(trace, PriceTable.load())
    assert run.persona == "old_style"
    assert run.metrics["prompt_tokens"] == 1000 and run.metrics["completion_tokens"] == 100
    assert run.metrics["cost_usd"] > 0
    assert run.params["provider"] == "openai"
    request, _ = records.trace_request([trace], PriceTable.load())
    root = span_attributes(request.resource_spans[0].scope_spans[0].spans[0])
    assert "hello there" in root["mlflow.spanInputs"] and "hi" in root["mlflow.spanOutputs"]


def test_openai_v2_before_2x_attributes():
    span = _span(
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "az.ai.openai",
            "gen_ai.openai.request.seed": 7,
            "gen_ai.openai.request.response_format": "json_object",
            "gen_ai.openai.request.service_tier": "auto",
            "gen_ai.openai.response.service_tier": "default",
            "gen_ai.openai.response.system_fingerprint": "fp_1",
        }
    )
    assert legacy.translate(span)
    attrs = span_attributes(span)
    assert attrs["gen_ai.provider.name"] == "azure.ai.openai"
    assert attrs["gen_ai.request.seed"] == 7
    assert attrs["gen_ai.output.type"] == "json"
    assert attrs["openai.request.service_tier"] == "auto"
    assert attrs["openai.response.service_tier"] == "default"
    assert attrs["openai.response.system_fingerprint"] == "fp_1"
    assert not [k for k in attrs if k.startswith(("gen_ai.openai.", "gen_ai.system"))]


def test_semconv_1_26_content_events():
    span = _span({"gen_ai.operation.name": "chat"})
    prompt = span.events.add(name="gen_ai.content.prompt")
    prompt.attributes.append(kv("gen_ai.prompt", json.dumps([{"role": "user", "content": "Tell me a joke"}])))
    completion = span.events.add(name="gen_ai.content.completion")
    completion.attributes.append(
        kv(
            "gen_ai.completion",
            json.dumps(
                [
                    {
                        "message": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "type": "function",
                                    "function": {"name": "joke", "arguments": "{}"},
                                }
                            ],
                        },
                        "finish_reason": "tool_calls",
                    }
                ]
            ),
        )
    )
    assert legacy.translate(span)
    attrs = span_attributes(span)
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Tell me a joke"}]}
    ]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [{"type": "tool_call", "name": "joke", "id": "c1", "arguments": {}}],
            "finish_reason": "tool_calls",
        }
    ]


def test_multimodal_content_blocks():
    span = _span(
        {
            "gen_ai.prompt.0.role": "user",
            "gen_ai.prompt.0.content": json.dumps(
                [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
                ]
            ),
        }
    )
    legacy.translate(span)
    (message,) = json.loads(span_attributes(span)["gen_ai.input.messages"])
    assert message["parts"] == [
        {"type": "text", "content": "what is this?"},
        {"type": "uri", "modality": "image", "uri": "https://example.test/cat.png"},
    ]


def test_current_attributes_win_over_older_ones():
    span = _span(
        {
            "gen_ai.provider.name": "openai",
            "gen_ai.system": "something_else",
            "gen_ai.usage.input_tokens": 5,
            "gen_ai.usage.prompt_tokens": 99,
            "gen_ai.input.messages": "[]",
            "gen_ai.prompt.0.content": "ignored",
        }
    )
    assert legacy.translate(span)
    attrs = span_attributes(span)
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] == 5
    assert attrs["gen_ai.input.messages"] == "[]"
    assert "gen_ai.prompt.0.content" not in attrs


def test_current_spans_pass_unchanged():
    # What opentelemetry-instrumentation-genai-openai 1.3b0 and OpenLLMetry 0.62 emit today.
    official = _span(
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            "server.address": "127.0.0.1",
            "server.port": 4318,
            "gen_ai.response.finish_reasons": ["stop"],
            "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
            "gen_ai.usage.input_tokens": 14,
            "gen_ai.usage.output_tokens": 4,
            "gen_ai.input.messages": '[{"role":"user","parts":[{"content":"hi","type":"text"}],"name":null}]',
            "openai.response.service_tier": "default",
        }
    )
    before = official.SerializeToString()
    assert not legacy.needs_translation(official)
    assert not legacy.translate(official)
    assert official.SerializeToString() == before
    ours = llm_span(persona="p")
    assert not legacy.translate(ours)
