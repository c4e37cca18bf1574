"""Prompt versions, A/B variants and the app's version: run params, run and trace tags, links."""

from __future__ import annotations

import json
from typing import Any

from genai_mlflow import semconv as sc
from genai_mlflow.exporter import records

from .test_records import PRICES, attrs_of, make_span, posted, standalone_call, trace_of, web_request

GREETING_2 = {
    sc.GENAI_MLFLOW_PROMPTS: "system/3,greeting/2",
    sc.GENAI_MLFLOW_PROMPT_NAME: "greeting",
    sc.GENAI_MLFLOW_PROMPT_VERSION: "2",
    sc.GENAI_MLFLOW_AB_TEST: "tone",
    sc.GENAI_MLFLOW_VARIANT: "long",
    sc.GENAI_MLFLOW_APP_VERSION: "v1.2.3",
}


def _root_tags(trace: records.LocalTrace, **kwargs: Any) -> dict[str, Any]:
    spans, _ = posted(trace, **kwargs)
    prefix = sc.MLFLOW_TRACE_TAG_PREFIX
    return {k[len(prefix) :]: v for k, v in attrs_of(spans[0]).items() if k.startswith(prefix)}


def _registered(*known: str):
    return lambda name, version: f"{name}/{version}" in known


def test_labels_become_run_params_and_trace_tags() -> None:
    trace = standalone_call(**GREETING_2)
    run = records.run_record(trace, PRICES)
    assert {k: run.params[k] for k in ("prompts", "prompt.name", "prompt.version", "ab_test", "variant")} == {
        "prompts": "system/3,greeting/2",
        "prompt.name": "greeting",
        "prompt.version": "2",
        "ab_test": "tone",
        "variant": "long",
    }
    assert run.params["app_version"] == "v1.2.3"
    assert run.tags[sc.GENAI_MLFLOW_APP_VERSION] == "v1.2.3"
    tags = _root_tags(trace)
    for key, value in GREETING_2.items():
        assert tags[key] == value
    assert tags[sc.GENAI_MLFLOW_MODEL] == "gpt-4o-mini"  # the model the app asked for


def test_labels_rank_right_after_the_model_when_params_are_cut() -> None:
    many = {f"{sc.GEN_AI_REQUEST_PREFIX}extra_{i:03d}": i for i in range(150)}
    run = records.run_record(standalone_call(**GREETING_2, **many), PRICES)
    assert len(run.params) == 100
    assert {"prompts", "prompt.version", "variant", "app_version"} <= set(run.params)


def test_only_registered_numbered_versions_are_linked() -> None:
    trace = standalone_call(
        **{**GREETING_2, sc.GENAI_MLFLOW_PROMPTS: "system/3,greeting/2,draft/v2-beta,ghost/9"}
    )
    registered = _registered("system/3", "greeting/2", "draft/v2-beta")
    expected = [{"name": "system", "version": "3"}, {"name": "greeting", "version": "2"}]
    run = records.run_record(trace, PRICES, registered)
    assert json.loads(run.tags[sc.MLFLOW_LINKED_PROMPTS]) == expected
    assert json.loads(_root_tags(trace, registered=registered)[sc.MLFLOW_LINKED_PROMPTS]) == expected
    links = records.trace_links(trace, PRICES, registered)
    assert links.prompts == (("system", "3"), ("greeting", "2"))
    # Nothing registered: no link anywhere, the labels stay.
    assert sc.MLFLOW_LINKED_PROMPTS not in records.run_record(trace, PRICES).tags
    assert sc.MLFLOW_LINKED_PROMPTS not in _root_tags(trace)


def test_a_trace_lists_every_prompt_its_calls_used_and_mixed_labels() -> None:
    first = {
        sc.GENAI_MLFLOW_PROMPTS: "planner/1",
        sc.GENAI_MLFLOW_VARIANT: "a",
        sc.GENAI_MLFLOW_APP_VERSION: "v1",
    }
    second = {
        sc.GENAI_MLFLOW_PROMPTS: "writer/5",
        sc.GENAI_MLFLOW_VARIANT: "b",
        sc.GENAI_MLFLOW_APP_VERSION: "v1",
    }
    trace = web_request()
    llm = [s for s in trace.spans if s.name.startswith("chat")]
    for span, labels in zip(llm, (first, second), strict=True):
        span.attributes.extend(make_span("x", 99, attrs=labels).attributes)
    labels = records.trace_labels(trace, records._calls(trace, PRICES))
    assert labels[sc.GENAI_MLFLOW_PROMPTS] == "planner/1,writer/5"
    assert labels[sc.GENAI_MLFLOW_VARIANT] == "mixed"
    assert labels[sc.GENAI_MLFLOW_APP_VERSION] == "v1"


def test_app_version_falls_back_to_the_resources_service_version() -> None:
    span = standalone_call().spans[0]
    trace = trace_of(span, resource={"service.name": "api", "service.version": "2026.11.27"})
    assert records.run_record(trace, PRICES).params["app_version"] == "2026.11.27"
    assert records.trace_links(trace, PRICES, _registered()).app_version == "2026.11.27"
    (point,) = records.window_points(trace, PRICES)
    assert point.app_version == "2026.11.27"


def test_streamed_call_gives_the_trace_its_time_to_first_token_tag() -> None:
    trace = standalone_call(**{sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: 0.25, sc.GEN_AI_REQUEST_STREAM: True})
    assert float(_root_tags(trace)[sc.GENAI_MLFLOW_TTFT_MS]) == 250.0
    assert sc.GENAI_MLFLOW_TTFT_MS not in _root_tags(standalone_call())


def test_trace_links_restate_the_roots_time_and_state() -> None:
    links = records.trace_links(web_request(), PRICES, _registered())
    start_ms = web_request().top.start_time_unix_nano // 1_000_000
    assert links.timing == records.TraceTiming(start_ms, 2000, "OK")
    failed = trace_of(
        make_span("chat gpt-4o-mini", 1, end_ms=50, attrs={sc.GEN_AI_OPERATION_NAME: "chat"}, error=True)
    )
    assert records.trace_links(failed, PRICES, _registered()).timing.state == "ERROR"


def test_calls_without_labels_add_nothing() -> None:
    run = records.run_record(standalone_call(), PRICES)
    assert not {"prompts", "prompt.name", "variant", "ab_test", "app_version"} & set(run.params)
    assert sc.GENAI_MLFLOW_APP_VERSION not in run.tags
    tags = _root_tags(standalone_call())
    assert not {sc.GENAI_MLFLOW_PROMPTS, sc.GENAI_MLFLOW_VARIANT, sc.GENAI_MLFLOW_APP_VERSION} & set(tags)
