"""Spans to MLflow records, from OTLP spans built here: what a person reads in MLflow."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags, Status

from genai_mlflow import semconv as sc
from genai_mlflow.exporter import records
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.records import LocalTrace

PRICES = PriceTable.load()
TRACE_ID = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
T0_MS = 1_764_235_800_000  # 2025-11-27T09:30:00Z
DAY = date(2025, 11, 27)
PARENT_KNOWN = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
PARENT_REMOTE = PARENT_KNOWN | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK

# gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens
COST_12_3 = (12 * 0.15 + 3 * 0.60) / 1e6


# ---------------------------------------------------------------------------------------------
# Span builders


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue(string_value=value)


def span_id(n: int) -> bytes:
    return n.to_bytes(8, "big")


def make_span(
    name: str,
    n: int,
    *,
    parent: int | bytes | None = None,
    start_ms: int = 0,
    end_ms: int = 100,
    attrs: dict[str, Any] | None = None,
    error: bool = False,
    flags: int = 0,
    kind: int = Span.SPAN_KIND_INTERNAL,
) -> Span:
    span = Span(
        trace_id=TRACE_ID,
        span_id=span_id(n),
        name=name,
        kind=kind,
        flags=flags,
        start_time_unix_nano=(T0_MS + start_ms) * 1_000_000,
        end_time_unix_nano=(T0_MS + end_ms) * 1_000_000,
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET),
    )
    if parent is not None:
        span.parent_span_id = parent if isinstance(parent, bytes) else span_id(parent)
    span.attributes.extend(KeyValue(key=k, value=any_value(v)) for k, v in (attrs or {}).items())
    return span


def user_messages(text: str) -> str:
    return json.dumps([{"role": "user", "parts": [{"type": "text", "content": text}]}])


def answer_messages(text: str, finish: str = "stop") -> str:
    return json.dumps(
        [{"role": "assistant", "parts": [{"type": "text", "content": text}], "finish_reason": finish}]
    )


def llm_attrs(
    *,
    model: str = "gpt-4o-mini",
    response_model: str | None = "gpt-4o-mini-2024-07-18",
    input_tokens: int | None = 12,
    output_tokens: int | None = 3,
    prompt: str | None = "What is 2+2?",
    answer: str | None = "4",
    finish: str = "stop",
    **extra: Any,
) -> dict[str, Any]:
    """The attributes genai_mlflow's OpenAI instrumentation puts on a chat span."""
    attrs: dict[str, Any] = {
        sc.GEN_AI_OPERATION_NAME: "chat",
        sc.GEN_AI_PROVIDER_NAME: "openai",
        sc.GEN_AI_REQUEST_MODEL: model,
        sc.GEN_AI_REQUEST_STREAM: False,
        sc.GEN_AI_REQUEST_TEMPERATURE: 0.7,
        sc.GEN_AI_REQUEST_MAX_TOKENS: 256,
        sc.GEN_AI_RESPONSE_FINISH_REASONS: [finish],
        sc.SERVER_ADDRESS: "api.openai.com",
    }
    if response_model:
        attrs[sc.GEN_AI_RESPONSE_MODEL] = response_model
    if input_tokens is not None:
        attrs[sc.GEN_AI_USAGE_INPUT_TOKENS] = input_tokens
    if output_tokens is not None:
        attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = output_tokens
    if prompt is not None:
        attrs[sc.GEN_AI_INPUT_MESSAGES] = user_messages(prompt)
    if answer is not None:
        attrs[sc.GEN_AI_OUTPUT_MESSAGES] = answer_messages(answer, finish)
    attrs.update(extra)
    return attrs


def trace_of(*spans: Span, resource: dict[str, Any] | None = None) -> LocalTrace:
    return LocalTrace(TRACE_ID, list(spans), {"service.name": "ask-api"} if resource is None else resource)


def standalone_call(**kwargs: Any) -> LocalTrace:
    return trace_of(
        make_span("chat gpt-4o-mini", 1, end_ms=300, attrs=llm_attrs(**kwargs), kind=Span.SPAN_KIND_CLIENT)
    )


def web_request(second: dict[str, Any] | None = None) -> LocalTrace:
    """GET /ask: two LLM calls and a database query, persona set on the LLM calls."""
    persona = {sc.GEN_AI_AGENT_NAME: "viral_creator"}
    first_call = llm_attrs(prompt="Write a hook about cats", answer="Cats rule.", **persona)
    second_call = llm_attrs(
        prompt="Make it shorter",
        answer="Cats!",
        input_tokens=30,
        output_tokens=5,
        **{**persona, **(second or {})},
    )
    return trace_of(
        make_span("GET /ask", 1, end_ms=2000, attrs={"http.route": "/ask"}, kind=Span.SPAN_KIND_SERVER),
        make_span("chat gpt-4o-mini", 2, parent=1, start_ms=100, end_ms=700, attrs=first_call),
        make_span("SELECT posts", 3, parent=1, start_ms=750, end_ms=800, attrs={"db.system": "postgresql"}),
        make_span("chat gpt-4o-mini", 4, parent=1, start_ms=900, end_ms=1800, attrs=second_call),
    )


def posted(trace: LocalTrace, **kwargs: Any) -> tuple[list[Span], list[records.Offload]]:
    request, offloads = records.trace_request([trace], PRICES, **kwargs)
    (resource_spans,) = request.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    return list(scope_spans.spans), offloads


def attrs_of(span: Span) -> dict[str, Any]:
    return records.span_attributes(span)


def previews(span: Span) -> tuple[str, str]:
    attrs = attrs_of(span)
    inputs = json.loads(attrs[sc.MLFLOW_SPAN_INPUTS])
    outputs = json.loads(attrs[sc.MLFLOW_SPAN_OUTPUTS])
    assert inputs["messages"][0]["role"] == "user"
    assert outputs["choices"][0]["message"]["role"] == "assistant"
    return inputs["messages"][0]["content"], outputs["choices"][0]["message"]["content"]


def span_cost_total(spans: list[Span]) -> float:
    return math.fsum(
        json.loads(attrs_of(s)[sc.MLFLOW_LLM_COST])["total_cost"]
        for s in spans
        if sc.MLFLOW_LLM_COST in attrs_of(s)
    )


# ---------------------------------------------------------------------------------------------
# A standalone LLM call


def test_standalone_call_is_one_run_with_every_value_a_reader_sees() -> None:
    run = records.run_record(standalone_call(), PRICES)

    assert run.trace_id == TRACE_ID.hex()
    assert run.persona == "default"
    assert run.day == DAY
    assert run.experiment_name == "default_2025-11-27"
    assert run.run_name == "chat gpt-4o-mini"
    assert (run.start_ms, run.end_ms) == (T0_MS, T0_MS + 300)
    assert run.status == "FINISHED"
    assert run.params == {
        "model": "gpt-4o-mini-2024-07-18",
        "provider": "openai",
        "operation": "chat",
        "request.model": "gpt-4o-mini",
        "request.max_tokens": "256",
        "request.temperature": "0.7",
        "request.stream": "false",
    }
    assert list(run.params)[:3] == ["model", "provider", "operation"]
    assert run.metrics == {
        "prompt_tokens": 12.0,
        "completion_tokens": 3.0,
        "total_tokens": 15.0,
        "llm_calls": 1.0,
        "latency_ms": 300.0,
        "cost_usd": pytest.approx(COST_12_3),
    }
    assert run.tags == {
        "genai_mlflow.trace_id": TRACE_ID.hex(),
        "genai_mlflow.persona": "default",
        "mlflow.runName": "chat gpt-4o-mini",
        "finish_reasons": "stop",
        "service.name": "ask-api",
    }


def test_standalone_call_trace_has_readable_previews_tags_and_cost() -> None:
    trace = standalone_call()
    (span,), offloads = posted(trace)
    attrs = attrs_of(span)

    assert offloads == []
    assert span.parent_span_id == b""
    assert previews(span) == ("What is 2+2?", "4")
    assert attrs[sc.MLFLOW_SPAN_INPUTS] == '{"messages": [{"role": "user", "content": "What is 2+2?"}]}'
    assert (
        attrs[sc.MLFLOW_SPAN_OUTPUTS] == '{"choices": [{"message": {"role": "assistant", "content": "4"}}]}'
    )
    assert attrs["mlflow.traceTag.genai_mlflow.trace_id"] == TRACE_ID.hex()
    assert attrs["mlflow.traceTag.genai_mlflow.persona"] == "default"
    assert attrs["mlflow.traceTag.mlflow.traceName"] == "chat gpt-4o-mini"
    cost = json.loads(attrs[sc.MLFLOW_LLM_COST])
    assert cost == {
        "input_cost": pytest.approx(12 * 0.15 / 1e6),
        "output_cost": pytest.approx(3 * 0.60 / 1e6),
        "total_cost": pytest.approx(COST_12_3),
    }
    assert cost["total_cost"] == records.run_record(trace, PRICES).metrics["cost_usd"]
    # The semconv attributes stay for MLflow's own translation of the span.
    assert attrs[sc.GEN_AI_INPUT_MESSAGES] == user_messages("What is 2+2?")
    assert sc.GENAI_MLFLOW_REMOTE_PARENT_SPAN_ID not in attrs


def test_trace_request_leaves_its_inputs_unchanged() -> None:
    trace = standalone_call()
    before = [s.SerializeToString() for s in trace.spans]
    records.trace_request([trace], PRICES, content_bound=10)
    assert [s.SerializeToString() for s in trace.spans] == before


# ---------------------------------------------------------------------------------------------
# A web request with two LLM calls and a database query


def test_web_request_run_sums_its_llm_calls_and_takes_the_root_for_name_and_time() -> None:
    run = records.run_record(web_request(), PRICES)

    assert run.persona == "viral_creator"
    assert run.experiment_name == "viral_creator_2025-11-27"
    assert run.run_name == "GET /ask"
    assert (run.start_ms, run.end_ms) == (T0_MS, T0_MS + 2000)
    assert run.params["model"] == "gpt-4o-mini-2024-07-18"
    assert run.params["request.temperature"] == "0.7"
    assert run.metrics["llm_calls"] == 2.0
    assert run.metrics["prompt_tokens"] == 42.0
    assert run.metrics["completion_tokens"] == 8.0
    assert run.metrics["total_tokens"] == 50.0
    assert run.metrics["latency_ms"] == 2000.0
    assert run.metrics["cost_usd"] == pytest.approx((42 * 0.15 + 8 * 0.60) / 1e6)
    assert "time_to_first_token_ms" not in run.metrics
    assert run.tags["finish_reasons"] == "stop"
    assert "error.type" not in run.tags
    assert run.status == "FINISHED"


def test_web_request_trace_keeps_every_span_and_previews_first_question_and_last_answer() -> None:
    trace = web_request()
    spans, _ = posted(trace)

    assert [s.name for s in spans] == ["GET /ask", "chat gpt-4o-mini", "SELECT posts", "chat gpt-4o-mini"]
    root = spans[0]
    assert root.parent_span_id == b""
    assert previews(root) == ("Write a hook about cats", "Cats!")
    assert attrs_of(root)["mlflow.traceTag.mlflow.traceName"] == "GET /ask"
    assert attrs_of(root)["mlflow.traceTag.genai_mlflow.persona"] == "viral_creator"
    assert [sc.MLFLOW_LLM_COST in attrs_of(s) for s in spans] == [False, True, False, True]
    assert attrs_of(spans[2]) == {"db.system": "postgresql"}
    assert all(s.parent_span_id == span_id(1) for s in spans[1:])
    # Only the root carries previews: MLflow takes them from the root span alone.
    assert all(sc.MLFLOW_SPAN_INPUTS not in attrs_of(s) for s in spans[1:])


def test_run_cost_equals_the_sum_of_the_spans_costs() -> None:
    trace = web_request()
    spans, _ = posted(trace)
    assert records.run_record(trace, PRICES).metrics["cost_usd"] == span_cost_total(spans)


def test_calls_differing_in_temperature_make_the_param_mixed() -> None:
    run = records.run_record(web_request({sc.GEN_AI_REQUEST_TEMPERATURE: 0.2}), PRICES)
    assert run.params["request.temperature"] == "mixed"
    assert run.params["request.max_tokens"] == "256"
    assert run.params["model"] == "gpt-4o-mini-2024-07-18"


def test_a_param_only_some_calls_have_is_mixed() -> None:
    run = records.run_record(web_request({"gen_ai.request.seed": 7}), PRICES)
    assert run.params["request.seed"] == "mixed"


def test_calls_to_different_models_make_model_mixed_and_cost_still_sums() -> None:
    trace = web_request({sc.GEN_AI_REQUEST_MODEL: "gpt-4o", sc.GEN_AI_RESPONSE_MODEL: "gpt-4o-2024-08-06"})
    run = records.run_record(trace, PRICES)
    assert run.params["model"] == "mixed"
    assert run.params["request.model"] == "mixed"
    expected = (12 * 0.15 + 3 * 0.60 + 30 * 2.50 + 5 * 10.00) / 1e6
    assert run.metrics["cost_usd"] == pytest.approx(expected)
    assert run.metrics["cost_usd"] == span_cost_total(posted(trace)[0])


def test_persona_comes_from_the_root_most_span_that_has_one() -> None:
    trace = trace_of(
        make_span("GET /ask", 1, end_ms=2000, attrs={sc.GEN_AI_AGENT_NAME: "front_desk"}),
        make_span("chat", 2, parent=1, start_ms=10, attrs=llm_attrs(**{sc.GEN_AI_AGENT_NAME: "writer"})),
    )
    assert records.trace_persona(trace) == "front_desk"


def test_persona_falls_back_to_the_resource_then_default() -> None:
    call = make_span("chat", 1, attrs=llm_attrs())
    assert records.trace_persona(trace_of(call, resource={sc.GEN_AI_AGENT_NAME: " support "})) == "support"
    assert records.trace_persona(trace_of(call, resource={})) == "default"


# ---------------------------------------------------------------------------------------------
# Distributed traces and completeness


def test_local_root_under_a_remote_parent_is_sent_as_the_root() -> None:
    remote = bytes.fromhex("b7ad6b7169203331")
    trace = trace_of(
        make_span("POST /summarise", 1, parent=remote, end_ms=900, flags=PARENT_REMOTE),
        make_span(
            "chat gpt-4o-mini", 2, parent=1, start_ms=50, end_ms=800, attrs=llm_attrs(), flags=PARENT_KNOWN
        ),
    )
    assert records.is_complete(trace)
    assert trace.root is trace.spans[0]

    spans, _ = posted(trace)
    root = spans[0]
    assert root.parent_span_id == b""
    assert attrs_of(root)[sc.GENAI_MLFLOW_REMOTE_PARENT_SPAN_ID] == "b7ad6b7169203331"
    assert spans[1].parent_span_id == span_id(1)
    assert sc.GENAI_MLFLOW_REMOTE_PARENT_SPAN_ID not in attrs_of(spans[1])
    assert previews(root) == ("What is 2+2?", "4")
    assert records.run_record(trace, PRICES).run_name == "POST /summarise"


def test_a_trace_whose_local_root_has_not_arrived_is_incomplete() -> None:
    # The span flags say the missing parent is local: the root is still running.
    part = trace_of(make_span("chat", 2, parent=1, attrs=llm_attrs(), flags=PARENT_KNOWN))
    assert not records.is_complete(part)
    assert part.root is None

    whole = records.merge([part, trace_of(make_span("GET /ask", 1, end_ms=2000))])
    assert len(whole) == 1
    assert records.is_complete(whole[0])
    assert whole[0].root is not None and whole[0].root.name == "GET /ask"


def test_without_span_flags_a_missing_parent_is_taken_as_remote() -> None:
    assert records.is_complete(trace_of(make_span("chat", 2, parent=1, attrs=llm_attrs())))


def test_an_incomplete_trace_still_makes_a_run_and_a_readable_trace() -> None:
    # Written after a timeout or on replay: the orphan stands in for the root.
    trace = trace_of(
        make_span("chat gpt-4o-mini", 2, parent=1, end_ms=300, attrs=llm_attrs(), flags=PARENT_KNOWN)
    )
    run = records.run_record(trace, PRICES)
    assert run.run_name == "chat gpt-4o-mini"
    (span,), _ = posted(trace)
    assert span.parent_span_id == b""
    assert attrs_of(span)[sc.GENAI_MLFLOW_REMOTE_PARENT_SPAN_ID] == span_id(1).hex()


def test_local_traces_group_by_resource_and_trace_and_merge_dedupes_spans() -> None:
    other_trace = bytes.fromhex("11" * 16)
    request = ExportTraceServiceRequest()
    for service in ("a", "b"):
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.append(KeyValue(key="service.name", value=any_value(service)))
        scope = resource_spans.scope_spans.add()
        scope.spans.append(make_span(f"{service}-1", 1 if service == "a" else 2))
        late = make_span("other", 3)
        late.trace_id = other_trace
        scope.spans.append(late)
        scope.spans.append(Span(trace_id=TRACE_ID, span_id=b"", name="no id"))  # MLflow would reject it

    traces = records.local_traces(request)
    assert [
        (t.trace_id, t.resource_attributes["service.name"], [s.name for s in t.spans]) for t in traces
    ] == [
        (TRACE_ID, "a", ["a-1"]),
        (other_trace, "a", ["other"]),
        (TRACE_ID, "b", ["b-1"]),
        (other_trace, "b", ["other"]),
    ]

    newer = make_span("a-1 again", 1)
    merged = records.merge([*traces, trace_of(newer)])
    assert [t.trace_id for t in merged] == [TRACE_ID, other_trace]
    assert [s.name for s in merged[0].spans] == ["a-1 again", "b-1"]
    assert [s.name for s in merged[1].spans] == ["other"]


# ---------------------------------------------------------------------------------------------
# Failures, streams, capture off, tools


def test_a_failed_call_fails_the_run_and_says_why() -> None:
    failed = llm_attrs(
        input_tokens=None,
        output_tokens=None,
        answer=None,
        response_model=None,
        **{sc.ERROR_TYPE: "RateLimitError"},
    )
    del failed[sc.GEN_AI_RESPONSE_FINISH_REASONS]
    trace = trace_of(make_span("chat gpt-4o-mini", 1, end_ms=120, attrs=failed, error=True))

    run = records.run_record(trace, PRICES)
    assert run.status == "FAILED"
    assert run.tags["error.type"] == "RateLimitError"
    assert "finish_reasons" not in run.tags
    assert run.params["model"] == "gpt-4o-mini"  # the request model when there is no response
    assert run.metrics["prompt_tokens"] == 0.0
    assert run.metrics["cost_usd"] == 0.0  # no tokens, nothing billed

    (span,), _ = posted(trace)
    assert previews(span) == ("What is 2+2?", "failed: RateLimitError")


def test_error_type_lists_each_failed_calls_type_once() -> None:
    def failing(n: int, error_type: str | None) -> Span:
        attrs = llm_attrs(answer=None, **({sc.ERROR_TYPE: error_type} if error_type else {}))
        return make_span("chat", n, parent=1, start_ms=n * 10, attrs=attrs, error=True)

    trace = trace_of(
        make_span("job", 1, end_ms=1000),
        failing(2, "APITimeoutError"),
        failing(3, "APITimeoutError"),
        failing(4, None),  # status ERROR without error.type: semconv's fallback value
        make_span("chat", 5, parent=1, start_ms=60, attrs=llm_attrs()),
    )
    run = records.run_record(trace, PRICES)
    assert run.tags["error.type"] == "APITimeoutError,_OTHER"
    assert run.status == "FAILED"


def test_streamed_calls_give_the_first_ones_time_to_first_token() -> None:
    trace = trace_of(
        make_span("job", 1, end_ms=5000),
        make_span(
            "chat",
            3,
            parent=1,
            start_ms=900,
            attrs=llm_attrs(**{sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: 0.5}),
        ),
        make_span(
            "chat",
            2,
            parent=1,
            start_ms=100,
            attrs=llm_attrs(**{sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: 0.25}),
        ),
        make_span("chat", 4, parent=1, start_ms=50, attrs=llm_attrs()),  # not streamed
    )
    assert records.run_record(trace, PRICES).metrics["time_to_first_token_ms"] == 250.0


def test_capture_off_previews_summarise_the_call() -> None:
    trace = standalone_call(prompt=None, answer=None)
    (span,), _ = posted(trace)
    assert previews(span) == (
        "chat gpt-4o-mini (content not captured)",
        "finish: stop; 12 input + 3 output tokens (content not captured)",
    )
    assert sc.MLFLOW_LLM_COST in attrs_of(span)


def test_capture_off_tool_call_preview_names_the_tools() -> None:
    trace = standalone_call(
        prompt=None,
        answer=None,
        finish="tool_calls",
        **{sc.GENAI_MLFLOW_TOOL_CALL_NAMES: ["get_weather"], sc.GENAI_MLFLOW_TOOL_CALL_IDS: ["call_1"]},
    )
    (span,), _ = posted(trace)
    assert previews(span)[1] == (
        "tool calls: get_weather; finish: tool_calls; 12 input + 3 output tokens (content not captured)"
    )


def test_a_tool_call_only_answer_reads_as_a_call() -> None:
    output = [
        {
            "role": "assistant",
            "parts": [
                {"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
            ],
            "finish_reason": "tool_calls",
        }
    ]
    trace = standalone_call(answer=None, **{sc.GEN_AI_OUTPUT_MESSAGES: json.dumps(output)})
    (span,), _ = posted(trace)
    assert previews(span) == ("What is 2+2?", 'get_weather({"city": "Paris"})')


def test_the_last_user_message_is_the_request_preview() -> None:
    messages = [
        {"role": "user", "parts": [{"type": "text", "content": "Hi"}]},
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello!"}]},
        {
            "role": "user",
            "parts": [
                {"type": "text", "content": "What is in this photo?"},
                {"type": "uri", "modality": "image", "uri": "https://x/cat.png"},
            ],
        },
    ]
    trace = standalone_call(prompt=None, **{sc.GEN_AI_INPUT_MESSAGES: json.dumps(messages)})
    (span,), _ = posted(trace)
    assert previews(span)[0] == "What is in this photo?\n[image]"


def test_lone_surrogates_in_content_do_not_crash_anything() -> None:
    # JSON may escape a lone surrogate; it cannot go into protobuf or a database as is.
    prompt = '[{"role": "user", "parts": [{"type": "text", "content": "bad \\ud800 text"}]}]'
    answer = '[{"role": "assistant", "parts": [{"type": "text", "content": "\\udfff"}]}]'
    trace = standalone_call(
        prompt=None, answer=None, **{sc.GEN_AI_INPUT_MESSAGES: prompt, sc.GEN_AI_OUTPUT_MESSAGES: answer}
    )
    request, _ = records.trace_request([trace], PRICES)
    request.SerializeToString()
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert previews(span) == ("bad \ufffd text", "\ufffd")
    assert records.normalise_persona("a\ud800b") == "ab"


def test_unparseable_content_falls_back_to_a_summary() -> None:
    trace = standalone_call(prompt=None, answer=None, **{sc.GEN_AI_INPUT_MESSAGES: '[{"role": "user", "par'})
    (span,), _ = posted(trace)
    assert previews(span)[0] == "chat gpt-4o-mini (no user text)"


def test_cached_and_reasoning_tokens_are_summed_and_cached_ones_priced_lower() -> None:
    usage = {
        sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: 1000,
        sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: 64,
    }
    trace = standalone_call(
        input_tokens=3000, output_tokens=100, model="o4-mini", response_model=None, **usage
    )
    run = records.run_record(trace, PRICES)
    assert run.metrics["cached_tokens"] == 1000.0
    assert run.metrics["reasoning_tokens"] == 64.0
    assert run.metrics["cost_usd"] == pytest.approx((2000 * 1.10 + 1000 * 0.275 + 100 * 4.40) / 1e6)
    assert "cached_tokens" not in records.run_record(standalone_call(), PRICES).metrics


def test_an_unpriced_model_leaves_cost_out_and_says_which() -> None:
    trace = web_request({sc.GEN_AI_REQUEST_MODEL: "my-deployment", sc.GEN_AI_RESPONSE_MODEL: "my-deployment"})
    run = records.run_record(trace, PRICES)
    assert "cost_usd" not in run.metrics
    assert run.tags["genai_mlflow.cost_unknown_models"] == "my-deployment"
    spans, _ = posted(trace)
    assert [sc.MLFLOW_LLM_COST in attrs_of(s) for s in spans] == [False, True, False, False]


def test_tool_and_agent_spans_are_genai_but_not_llm_calls() -> None:
    tool = make_span(
        "execute_tool get_weather", 3, parent=1, attrs={sc.GEN_AI_OPERATION_NAME: "execute_tool"}
    )
    trace = trace_of(
        make_span("job", 1, end_ms=1000), make_span("chat", 2, parent=1, attrs=llm_attrs()), tool
    )
    assert records.is_genai(tool)
    assert not records.is_genai(trace.spans[0])
    assert [s.name for s in trace.genai_spans] == ["chat", "execute_tool get_weather"]
    assert records.run_record(trace, PRICES).metrics["llm_calls"] == 1.0


# ---------------------------------------------------------------------------------------------
# Personas


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("viral_creator", "viral_creator"),
        ("team/growth_bot 🚀", "team/growth_bot 🚀"),
        ("  support  ", "support"),
        ("", "default"),
        (None, "default"),
        ("  \t\n ", "default"),
        ("bad\x00\x1b[31mred\x7f", "bad[31mred"),
        ("line\u2028break", "linebreak"),
        ("\u202eevil", "evil"),
        ("cafe\u0301", "café"),
        ("👩\u200d💻 coder", "👩\u200d💻 coder"),
    ],
)
def test_normalise_persona(raw: str | None, expected: str) -> None:
    assert records.normalise_persona(raw) == expected


def test_long_personas_are_cut_to_200_characters_without_a_marker() -> None:
    assert records.normalise_persona("p" * 600) == "p" * 200
    # A cut inside a character (here a letter and its accent, then an emoji sequence) backs off.
    accented = "a" * 199 + "q\u0301"  # q with an acute has no precomposed form: two code points
    assert records.normalise_persona(accented) == "a" * 199
    emoji = "b" * 198 + "👩\u200d💻"
    assert records.normalise_persona(emoji) == "b" * 198


def test_personas_with_slashes_and_emoji_make_experiment_names_mlflow_accepts() -> None:
    from mlflow.utils.validation import _validate_experiment_name, _validate_tag_name

    for raw in ("team/growth_bot 🚀", "x" * 600, "a\x00b"):
        persona = records.normalise_persona(raw)
        name = records.experiment_name(persona, DAY)
        assert name == f"{persona}_2025-11-27"
        assert len(name) <= 256  # MLflow's experiments.name column
        _validate_experiment_name(name)
        for key in records.experiment_tags(persona, DAY):
            _validate_tag_name(key)
    assert records.experiment_tags("team/a_b", DAY) == {
        "genai_mlflow.persona": "team/a_b",
        "genai_mlflow.date": "2025-11-27",
    }


def test_persona_from_spans_is_normalised_everywhere() -> None:
    trace = standalone_call(**{sc.GEN_AI_AGENT_NAME: "  team/bot\n"})
    run = records.run_record(trace, PRICES)
    assert run.persona == "team/bot"
    assert run.tags["genai_mlflow.persona"] == "team/bot"
    assert run.experiment_name == "team/bot_2025-11-27"
    (span,), _ = posted(trace)
    assert attrs_of(span)["mlflow.traceTag.genai_mlflow.persona"] == "team/bot"


# ---------------------------------------------------------------------------------------------
# MLflow limits


def test_more_than_100_params_keeps_the_useful_ones_and_says_how_many_were_dropped() -> None:
    many = {f"gen_ai.request.extra_{i:03d}": i for i in range(120)}
    run = records.run_record(standalone_call(**many), PRICES)
    assert len(run.params) == 100
    assert list(run.params)[:7] == [
        "model",
        "provider",
        "operation",
        "request.model",
        "request.max_tokens",
        "request.temperature",
        "request.stream",
    ]
    # 127 params in all: the 7 above and extra_000..extra_092 are kept
    assert run.tags["genai_mlflow.params_truncated"] == "27"
    assert "request.extra_092" in run.params
    assert "request.extra_093" not in run.params


def test_param_keys_and_values_fit_mlflow() -> None:
    from mlflow.utils.validation import _validate_param_name

    odd = {
        "gen_ai.request.weird/key!": "x",
        "openai.request.service_tier": "flex",
        "gen_ai.request." + "k" * 300: "long key",
        "gen_ai.request.huge": "v" * 7000,
        sc.GEN_AI_REQUEST_STOP_SEQUENCES: ["\n\n", "END"],
    }
    run = records.run_record(standalone_call(**odd), PRICES)
    assert run.params["request.weird_key_"] == "x"
    assert run.params["request.service_tier"] == "flex"
    assert run.params["request." + "k" * 242] == "long key"
    assert len(run.params["request.huge"]) == 6000
    assert run.params["request.stop_sequences"] == '["\\n\\n", "END"]'
    for key in run.params:
        _validate_param_name(key)
        assert len(key) <= 250


def test_long_session_and_user_ids_are_cut_to_250_characters() -> None:
    ids = {sc.GEN_AI_CONVERSATION_ID: "s" * 300, sc.USER_ID: "u" * 9000, sc.SESSION_ID: "t" * 251}
    trace = standalone_call(**ids)
    (span,), _ = posted(trace)
    attrs = attrs_of(span)
    assert attrs[sc.GEN_AI_CONVERSATION_ID] == "s" * 250
    assert attrs[sc.SESSION_ID] == "t" * 250
    assert attrs[sc.USER_ID] == "u" * 250
    run = records.run_record(trace, PRICES)
    assert run.tags["gen_ai.conversation.id"] == "s" * 250
    assert run.tags["user.id"] == "u" * 250


def test_session_and_user_become_run_tags() -> None:
    trace = web_request({sc.GEN_AI_CONVERSATION_ID: "conv-7", sc.USER_ID: "alice"})
    run = records.run_record(trace, PRICES)
    assert run.tags["gen_ai.conversation.id"] == "conv-7"
    assert run.tags["user.id"] == "alice"


def test_only_small_resource_attributes_are_kept() -> None:
    resource = {"service.name": "ask-api", "process.command_line": "x" * 5000, "host.arch": "amd64"}
    request, _ = records.trace_request(
        [trace_of(make_span("chat", 1, attrs=llm_attrs()), resource=resource)], PRICES
    )
    kept = records.attributes(request.resource_spans[0].resource.attributes)
    assert kept == {"service.name": "ask-api", "host.arch": "amd64"}


# ---------------------------------------------------------------------------------------------
# Large content goes to the artifact store


def test_a_1mb_prompt_is_offloaded_with_a_reference_and_a_preview() -> None:
    prompt = "é" * 600_000  # 1.2 MB of UTF-8, 600k characters
    trace = standalone_call(prompt=prompt)
    original = user_messages(prompt)
    spans, offloads = posted(trace, artifact_uri=lambda path: f"mlflow-artifacts:/1/run/artifacts/{path}")

    (offload,) = offloads
    path = f"genai_content/{TRACE_ID.hex()}/{span_id(1).hex()}/gen_ai.input.messages.json"
    assert offload == records.Offload(span_id(1).hex(), sc.GEN_AI_INPUT_MESSAGES, path, original)

    attrs = attrs_of(spans[0])
    reference = json.loads(attrs[sc.GEN_AI_INPUT_MESSAGES])
    assert reference == {
        "genai_mlflow.offloaded": f"mlflow-artifacts:/1/run/artifacts/{path}",
        "bytes": len(original.encode()),
        "preview": original[:1000],
    }
    assert len(attrs[sc.GEN_AI_INPUT_MESSAGES].encode()) < 16 * 1024
    request_preview, response_preview = previews(spans[0])
    assert request_preview == "é" * 1999 + "…"
    assert response_preview == "4"
    assert attrs[sc.GEN_AI_OUTPUT_MESSAGES] == answer_messages("4")  # small: inline


def test_the_bound_counts_utf8_bytes() -> None:
    attrs = llm_attrs(prompt=None, **{"app.note": "€" * 100})  # 100 characters, 300 bytes
    (_, offloads) = posted(trace_of(make_span("chat", 1, attrs=attrs)), content_bound=299)
    assert [(o.key, o.artifact_path.rsplit("/", 1)[1]) for o in offloads] == [("app.note", "app.note.txt")]
    (_, offloads) = posted(trace_of(make_span("chat", 1, attrs=attrs)), content_bound=300)
    assert offloads == []


# ---------------------------------------------------------------------------------------------
# Mode window


def test_window_points_are_one_per_llm_call_keyed_by_persona_model_and_hour() -> None:
    trace = trace_of(
        make_span("job", 1, end_ms=3_600_000),
        make_span(
            "chat", 2, parent=1, start_ms=0, end_ms=400, attrs=llm_attrs(**{sc.GEN_AI_AGENT_NAME: "bot"})
        ),
        make_span(
            "chat",
            3,
            parent=1,
            start_ms=1_900_000,
            end_ms=1_900_250,  # 10:01:40: the next hour
            attrs=llm_attrs(
                model="my-deployment", response_model=None, answer=None, **{sc.ERROR_TYPE: "BadRequestError"}
            ),
            error=True,
        ),
    )
    first, second = records.window_points(trace, PRICES)

    assert first.key == "bot|gpt-4o-mini-2024-07-18|2025-11-27T09"
    assert (first.persona, first.model) == ("bot", "gpt-4o-mini-2024-07-18")
    assert first.hour == datetime(2025, 11, 27, 9, tzinfo=UTC)
    assert first.timestamp_ms == T0_MS + 400
    assert first.metrics == {
        "latency_ms": 400.0,
        "prompt_tokens": 12.0,
        "completion_tokens": 3.0,
        "total_tokens": 15.0,
        "cost_usd": pytest.approx(COST_12_3),
    }
    assert not first.failed

    assert second.key == "bot|my-deployment|2025-11-27T10"
    assert second.hour == datetime(2025, 11, 27, 10, tzinfo=UTC)
    assert second.failed
    assert "cost_usd" not in second.metrics  # not priced


def test_window_cost_matches_the_trace_cost() -> None:
    trace = web_request()
    points = records.window_points(trace, PRICES)
    assert math.fsum(p.metrics["cost_usd"] for p in points) == span_cost_total(posted(trace)[0])


# ---------------------------------------------------------------------------------------------
# Cross-checks with MLflow's own (pure) code


def test_mlflow_turns_our_previews_into_plain_text() -> None:
    from mlflow.tracing.utils.truncation import _get_truncated_preview

    for trace, expected in [
        (standalone_call(), ("What is 2+2?", "4")),
        (
            standalone_call(prompt=None, answer=None),
            previews(posted(standalone_call(prompt=None, answer=None))[0][0]),
        ),
        (standalone_call(prompt="é" * 600_000), ("é" * 997 + "...", "4")),
    ]:
        (root, *_), _ = posted(trace)
        attrs = attrs_of(root)
        assert _get_truncated_preview(attrs[sc.MLFLOW_SPAN_INPUTS], role="user") == expected[0]
        assert _get_truncated_preview(attrs[sc.MLFLOW_SPAN_OUTPUTS], role="assistant") == expected[1]


def test_mlflow_reads_every_posted_span_and_sees_one_root() -> None:
    from mlflow.entities import Span as MlflowSpan

    remote = bytes.fromhex("b7ad6b7169203331")
    trace = trace_of(
        make_span("POST /a", 1, parent=remote, end_ms=900, flags=PARENT_REMOTE),
        make_span("chat", 2, parent=1, start_ms=50, attrs=llm_attrs(prompt="x" * 40_000)),
        # A second span directly under the remote parent: it hangs from the root instead.
        make_span("background", 3, parent=remote, start_ms=60, flags=PARENT_REMOTE),
    )
    request, offloads = records.trace_request([trace], PRICES)
    parsed = ExportTraceServiceRequest.FromString(request.SerializeToString())
    resource_spans = parsed.resource_spans[0]
    spans = [
        MlflowSpan.from_otel_proto(s, resource=resource_spans.resource)
        for s in resource_spans.scope_spans[0].spans
    ]
    assert [s.name for s in spans if s.parent_id is None] == ["POST /a"]
    assert spans[0].trace_id == "tr-" + TRACE_ID.hex()
    background = records.span_attributes(resource_spans.scope_spans[0].spans[2])
    assert background[sc.GENAI_MLFLOW_REMOTE_PARENT_SPAN_ID] == remote.hex()
    assert resource_spans.scope_spans[0].spans[2].parent_span_id == span_id(1)
    assert [o.key for o in offloads] == [sc.GEN_AI_INPUT_MESSAGES]
