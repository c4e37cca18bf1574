"""prompt(), variant(), prompts loaded from the registry and the app's version, on LLM spans."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import openai
import pytest
from opentelemetry import baggage, context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import genai_mlflow
from genai_mlflow import semconv as sc
from genai_mlflow.assignment import assign
from genai_mlflow.context import note_prompt_loaded

from .spans import only_span

MESSAGES = [{"role": "user", "content": "hello"}]
LABELS = (
    sc.GENAI_MLFLOW_PROMPTS,
    sc.GENAI_MLFLOW_PROMPT_NAME,
    sc.GENAI_MLFLOW_PROMPT_VERSION,
    sc.GENAI_MLFLOW_AB_TEST,
    sc.GENAI_MLFLOW_VARIANT,
    sc.GENAI_MLFLOW_APP_VERSION,
)


@dataclass
class FakePromptVersion:
    """What mlflow.genai.load_prompt returns, as far as prompt() reads it (the real one is in
    tests/integration/test_prompts.py)."""

    name: str
    version: int


def _call(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def _labels(exporter: InMemorySpanExporter) -> list[dict[str, object]]:
    return [
        {k: v for k, v in (s.attributes or {}).items() if k in LABELS} for s in exporter.get_finished_spans()
    ]


def test_prompt_scope_labels_the_calls_inside_it(instrumented, client: openai.OpenAI, span_exporter):
    with genai_mlflow.prompt("greeting", 2):
        _call(client)
    _call(client)
    assert _labels(span_exporter) == [
        {
            sc.GENAI_MLFLOW_PROMPTS: "greeting/2",
            sc.GENAI_MLFLOW_PROMPT_NAME: "greeting",
            sc.GENAI_MLFLOW_PROMPT_VERSION: "2",
        },
        {},
    ]


def test_prompt_takes_a_prompt_version_and_nests(instrumented, client: openai.OpenAI, span_exporter):
    with genai_mlflow.prompt(FakePromptVersion("system", 3)):
        with genai_mlflow.prompt("greeting", "v2-beta"):
            _call(client)
            with genai_mlflow.prompt("greeting", 5):  # the same prompt again: the inner version wins
                _call(client)
        _call(client)
    first, second, third = _labels(span_exporter)
    assert first[sc.GENAI_MLFLOW_PROMPTS] == "system/3,greeting/v2-beta"
    assert (first[sc.GENAI_MLFLOW_PROMPT_NAME], first[sc.GENAI_MLFLOW_PROMPT_VERSION]) == (
        "greeting",
        "v2-beta",
    )
    assert second[sc.GENAI_MLFLOW_PROMPTS] == "system/3,greeting/5"
    assert third == {
        sc.GENAI_MLFLOW_PROMPTS: "system/3",
        sc.GENAI_MLFLOW_PROMPT_NAME: "system",
        sc.GENAI_MLFLOW_PROMPT_VERSION: "3",
    }


async def test_prompt_decorator_on_async_functions(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter
):
    @genai_mlflow.prompt("summary", 1)
    async def summarise() -> None:
        await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    @genai_mlflow.prompt("summary", 2)
    async def summarise_v2() -> None:
        await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    await asyncio.gather(summarise(), summarise_v2(), summarise())
    versions = sorted(str(s.attributes[sc.GENAI_MLFLOW_PROMPTS]) for s in span_exporter.get_finished_spans())  # type: ignore[index]
    assert versions == ["summary/1", "summary/1", "summary/2"]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((42, 1), TypeError, "prompt name must be a string"),
        (("greeting",), TypeError, r"needs a version, e.g. prompt\('greeting', 1\)"),
        ((object(),), TypeError, "or a PromptVersion from mlflow.genai.load_prompt; got object"),
        (("greeting", 1.5), TypeError, "prompt version must be a string or an int, got float"),
        (("greet/ing", 1), ValueError, "prompt name 'greet/ing' contains '/'"),
        (("greeting", "1,2"), ValueError, "prompt version '1,2' contains ','"),
        (("", 1), ValueError, "prompt name must be non-empty"),
        ((" greeting", 1), ValueError, "without spaces at its ends"),
    ],
)
def test_prompt_rejects_bad_input_with_a_precise_error(args, error, message):
    with pytest.raises(error, match=message):
        genai_mlflow.prompt(*args)


def test_variant_is_deterministic_and_labels_calls(instrumented, client: openai.OpenAI, span_exporter):
    for user in ("alice", "bob", "carol", "alice"):
        with genai_mlflow.variant("tone", ["short", "long"], key=user) as chosen:
            assert chosen.name == assign("tone", ["short", "long"], user)
            assert str(chosen) == chosen.name
            _call(client)
    labels = _labels(span_exporter)
    assert [label[sc.GENAI_MLFLOW_AB_TEST] for label in labels] == ["tone"] * 4
    assert labels[0][sc.GENAI_MLFLOW_VARIANT] == labels[3][sc.GENAI_MLFLOW_VARIANT]  # same user, same variant
    assert [label[sc.GENAI_MLFLOW_VARIANT] for label in labels] == [
        assign("tone", ["short", "long"], user) for user in ("alice", "bob", "carol", "alice")
    ]


def test_variant_weights_and_errors():
    assert genai_mlflow.variant("t", ["a", "b"], key="k", weights=[0, 1]).name == "b"
    with pytest.raises(ValueError, match="weights"):
        genai_mlflow.variant("t", ["a", "b"], key="k", weights=[1])
    with pytest.raises(ValueError):
        genai_mlflow.variant("t", ["a", "a"], key="k")


def test_labels_cross_services_in_baggage(instrumented, client: openai.OpenAI, span_exporter):
    """A prompt or variant chosen upstream (another service) arrives in baggage."""
    ctx = baggage.set_baggage(sc.GENAI_MLFLOW_PROMPTS, "greeting/7")
    ctx = baggage.set_baggage(sc.GENAI_MLFLOW_VARIANT, "long", ctx)
    token = context.attach(ctx)
    try:
        _call(client)
    finally:
        context.detach(token)
    attributes = only_span(span_exporter).attributes or {}
    assert attributes[sc.GENAI_MLFLOW_PROMPTS] == "greeting/7"
    assert attributes[sc.GENAI_MLFLOW_VARIANT] == "long"


def test_app_version_from_argument_and_environment(
    instrument, client: openai.OpenAI, span_exporter, monkeypatch
):
    monkeypatch.setenv("GENAI_MLFLOW_APP_VERSION", "from-env")
    instrumentor = instrument()
    _call(client)
    instrumentor.uninstrument()
    instrument(app_version="v1.2.3")
    _call(client)
    assert [label.get(sc.GENAI_MLFLOW_APP_VERSION) for label in _labels(span_exporter)] == [
        "from-env",
        "v1.2.3",
    ]


def test_a_load_counts_for_later_calls_in_its_scope_only(instrumented, client: openai.OpenAI, span_exporter):
    _call(client)  # before any load
    with genai_mlflow.persona("writer"):
        note_prompt_loaded("greeting", 4)
        _call(client)
        with genai_mlflow.prompt("system", 1):
            note_prompt_loaded("style", 2)
            _call(client)  # the outer load counts too
        _call(client)  # the inner scope's load has ended with it
    _call(client)  # the persona scope has ended
    labels = _labels(span_exporter)
    assert labels[0] == {} and labels[4] == {}
    assert labels[1] == {
        sc.GENAI_MLFLOW_PROMPTS: "greeting/4",
        sc.GENAI_MLFLOW_PROMPT_NAME: "greeting",
        sc.GENAI_MLFLOW_PROMPT_VERSION: "4",
    }
    assert labels[2][sc.GENAI_MLFLOW_PROMPTS] == "system/1,greeting/4,style/2"
    # An explicit prompt() names the call's prompt; loads only join the list.
    assert (labels[2][sc.GENAI_MLFLOW_PROMPT_NAME], labels[2][sc.GENAI_MLFLOW_PROMPT_VERSION]) == (
        "system",
        "1",
    )
    assert labels[3][sc.GENAI_MLFLOW_PROMPTS] == "greeting/4"


def test_a_load_outside_scopes_counts_within_its_trace(
    instrumented, client: openai.OpenAI, span_exporter, tracer_provider: TracerProvider
):
    """A traced web request that loads a prompt and then calls the model, with no scope at all;
    the thread's next request (another trace) does not inherit the load."""
    tracer = tracer_provider.get_tracer("web")
    note_prompt_loaded("orphan", 1)  # no scope, no trace: nothing to attribute it to
    with tracer.start_as_current_span("GET /first"):
        note_prompt_loaded("greeting", 3)
        _call(client)
    with tracer.start_as_current_span("GET /second"):
        _call(client)
    _call(client)
    llm = [s for s in span_exporter.get_finished_spans() if s.name.startswith("chat")]
    assert [(s.attributes or {}).get(sc.GENAI_MLFLOW_PROMPTS) for s in llm] == ["greeting/3", None, None]


async def test_loads_in_concurrent_tasks_stay_apart(
    instrumented, async_client: openai.AsyncOpenAI, span_exporter
):
    async def agent(prompt_name: str) -> None:
        note_prompt_loaded(prompt_name, 1)
        await asyncio.sleep(0)
        await async_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    async with genai_mlflow.persona("team"):
        await asyncio.gather(agent("planner"), agent("critic"))
    assert sorted(
        str((s.attributes or {})[sc.GENAI_MLFLOW_PROMPTS]) for s in span_exporter.get_finished_spans()
    ) == [
        "critic/1",
        "planner/1",
    ]
