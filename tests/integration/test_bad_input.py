"""Bad input against the real stack: each is stored, cut with a marker, or sanitised; never silently
dropped, and never an exception in the app from genai-mlflow.

- a 1 MB prompt: its content goes to the artifact store (S3 on moto) and the span keeps a reference;
- odd personas: empty, 600 characters, slashes and emoji, control characters;
- today's experiment soft-deleted by someone: it is restored;
- text that is not valid UTF-8 (lone surrogates, ``surrogateescape``d bytes);
- more than MLflow's 100 params in one run.
"""

from __future__ import annotations

import json
import os
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
from mlflow import MlflowClient
from mlflow.entities import Run, Trace
from opentelemetry import trace
from opentelemetry.trace import SpanKind

import genai_mlflow
from genai_mlflow.setup import Handle
from genai_mlflow.testing.openai_server import OpenAIServer
from tests.mlflow_stack import MlflowStack

TODAY = datetime.now(UTC).strftime("%Y-%m-%d")
MODEL = "gpt-4o-mini"
TRACE_ID_TAG = "genai_mlflow.trace_id"
OFFLOADED = "genai_mlflow.offloaded"
tracer = trace.get_tracer("tests.bad_input")


def _ask(client: openai.OpenAI, text: str, **params: Any) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **params)


def _run_of(mlflow: MlflowClient, experiment_id: str, trace_id: str) -> Run:
    [run] = mlflow.search_runs([experiment_id], filter_string=f"tags.`{TRACE_ID_TAG}` = '{trace_id}'")
    return run


def _trace_of(mlflow: MlflowClient, experiment_id: str, run: Run) -> Trace:
    [found] = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id)
    assert isinstance(found, Trace)
    return found


def _llm_span_attributes(found: Trace) -> dict[str, Any]:
    [span] = [s for s in found.data.spans if "gen_ai.operation.name" in s.attributes]
    return dict(span.attributes)


def _json(value: Any) -> Any:
    """A JSON attribute as MLflow returns it: already decoded, or still a string."""
    return json.loads(value) if isinstance(value, str) else value


def _user_text(messages: Any) -> str:
    [message] = [m for m in _json(messages) if m["role"] == "user"]
    return "".join(part["content"] for part in message["parts"] if part["type"] == "text")


# --- a 1 MB prompt -------------------------------------------------------------------------------


def test_a_1mb_prompt_lands_with_its_content_in_the_artifact_store(
    handle: Handle,
    client: openai.OpenAI,
    server: OpenAIServer,
    mlflow_env: MlflowStack,
    persona_name: str,
    tmp_path: Path,
):
    prompt = os.urandom(500_000).hex()  # 1,000,000 characters that compress to nothing shorter
    server.reply_text = "Received."
    with genai_mlflow.persona(persona_name):
        _ask(client, prompt)
    assert handle.flush(60)

    mlflow = mlflow_env.client()
    experiment = mlflow.get_experiment_by_name(f"{persona_name}_{TODAY}")
    assert experiment is not None
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    found = _trace_of(mlflow, experiment.experiment_id, run)
    assert found.info.request_preview[:500] == prompt[:500]  # readable in the trace list
    assert found.info.response_preview == "Received."

    # The span holds a small reference, not the megabyte.
    raw = _llm_span_attributes(found)["gen_ai.input.messages"]
    reference = _json(raw)
    assert len(json.dumps(reference)) < 4096
    location = reference[OFFLOADED]
    prefix = f"runs:/{run.info.run_id}/"
    assert location.startswith(prefix)
    assert reference["bytes"] > 1_000_000
    assert prompt[:500] in reference["preview"]

    # The whole content is in the run's artifacts, as sent.
    artifact_path = location.removeprefix(prefix)
    local = Path(mlflow.download_artifacts(run.info.run_id, artifact_path, dst_path=str(tmp_path)))
    assert _user_text(json.loads(local.read_text(encoding="utf-8"))) == prompt

    # And the object is in the bucket.
    listing = mlflow_env.s3_client().list_objects_v2(
        Bucket=mlflow_env.bucket, Prefix=f"artifacts/{experiment.experiment_id}/{run.info.run_id}/"
    )
    sizes = {obj["Key"]: obj["Size"] for obj in listing.get("Contents", [])}
    [key] = [k for k in sizes if k.endswith("/" + artifact_path)]
    assert sizes[key] == local.stat().st_size


# --- odd personas --------------------------------------------------------------------------------


def _odd_personas(tag: str) -> dict[str, tuple[str, str]]:
    """label -> (persona as the app passes it, the persona genai-mlflow files it under)."""
    long = f"long_{tag}_" + "abcdefghij" * 59  # 604 characters
    return {
        "empty": ("", "default"),
        "600 characters": (long, long[:200]),
        "slashes, underscores, emoji": (f"team/{tag}/ops_bot 🤖 ünïcödé", f"team/{tag}/ops_bot 🤖 ünïcödé"),
        "control characters": (f"\t ctl_{tag}\x00\x07\x1b-name\r\n", f"ctl_{tag}-name"),
    }


def test_odd_personas_land_in_sensibly_named_experiments(
    handle: Handle, client: openai.OpenAI, mlflow_env: MlflowStack
):
    personas = _odd_personas(uuid.uuid4().hex[:8])
    trace_ids = {}
    for label, (given, _) in personas.items():
        with genai_mlflow.persona(given), tracer.start_as_current_span("persona check") as root:
            _ask(client, f"who am I? ({label})")
        trace_ids[label] = format(root.get_span_context().trace_id, "032x")
    assert handle.flush(60)

    mlflow = mlflow_env.client()
    for label, (_, expected) in personas.items():
        name = f"{expected}_{TODAY}"
        experiment = mlflow.get_experiment_by_name(name)
        assert experiment is not None, f"{label}: no experiment {name!r}"
        assert experiment.tags["genai_mlflow.persona"] == expected, label
        assert experiment.tags["genai_mlflow.date"] == TODAY
        run = _run_of(mlflow, experiment.experiment_id, trace_ids[label])
        assert run.data.tags["genai_mlflow.persona"] == expected, label
        assert run.info.status == "FINISHED"
        assert _trace_of(mlflow, experiment.experiment_id, run).info.trace_id == f"tr-{trace_ids[label]}"


# --- a soft-deleted experiment -------------------------------------------------------------------


def test_a_soft_deleted_experiment_is_restored_and_the_run_lands_in_it(
    handle: Handle, client: openai.OpenAI, mlflow_env: MlflowStack, persona_name: str
):
    mlflow = mlflow_env.client()
    experiment_id = mlflow.create_experiment(f"{persona_name}_{TODAY}")
    mlflow.delete_experiment(experiment_id)
    assert mlflow.get_experiment(experiment_id).lifecycle_stage == "deleted"

    with genai_mlflow.persona(persona_name):
        _ask(client, "anyone there?")
    assert handle.flush(60)
    assert mlflow.get_experiment(experiment_id).lifecycle_stage == "active"
    [run] = mlflow.search_runs([experiment_id])
    assert run.data.tags["genai_mlflow.persona"] == persona_name

    # Deleted again while the app runs, after the writer has learnt its id.
    mlflow.delete_experiment(experiment_id)
    with genai_mlflow.persona(persona_name):
        _ask(client, "still there?")
    assert handle.flush(60)
    assert mlflow.get_experiment(experiment_id).lifecycle_stage == "active"
    assert len(mlflow.search_runs([experiment_id])) == 2


# --- text that is not valid UTF-8 ----------------------------------------------------------------

NOT_UTF8 = {
    "lone surrogate": "lone \udcff end",
    "surrogateescape": b"caf\xe9 \xff bytes".decode("utf-8", "surrogateescape"),
}


def _readable(text: str) -> str:
    """What a reader finds for ``text``: each lone surrogate as U+FFFD."""
    return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)


def test_prompts_that_are_not_utf8_never_raise_from_our_code_and_land_readable(
    handle: Handle, client: openai.OpenAI, mlflow_env: MlflowStack, persona_name: str
):
    trace_ids: dict[str, str] = {}
    refused: dict[str, bool] = {}
    for label, text in NOT_UTF8.items():
        with genai_mlflow.persona(persona_name), tracer.start_as_current_span(label) as root:
            try:
                _ask(client, text)
                refused[label] = False
            except UnicodeEncodeError as exc:
                # The openai client cannot encode the request body; genai-mlflow's wrapper only
                # passes the client's own exception through.
                origin = traceback.extract_tb(exc.__traceback__)[-1].filename
                assert "genai_mlflow" not in origin
                assert f"{os.sep}openai{os.sep}" in origin
                refused[label] = True
        trace_ids[label] = format(root.get_span_context().trace_id, "032x")
    assert handle.flush(60)

    mlflow = mlflow_env.client()
    experiment = mlflow.get_experiment_by_name(f"{persona_name}_{TODAY}")
    assert experiment is not None
    for label, text in NOT_UTF8.items():
        run = _run_of(mlflow, experiment.experiment_id, trace_ids[label])
        attributes = _llm_span_attributes(_trace_of(mlflow, experiment.experiment_id, run))
        assert "gen_ai.input.messages" in attributes, f"{label}: the prompt was dropped"
        assert _user_text(attributes["gen_ai.input.messages"]) == _readable(text)
        if refused[label]:
            assert run.info.status == "FAILED"
            assert run.data.tags["error.type"] == "UnicodeEncodeError"


def test_an_answer_that_is_not_utf8_lands_readable(
    handle: Handle, client: openai.OpenAI, server: OpenAIServer, mlflow_env: MlflowStack, persona_name: str
):
    # A model or proxy that sends a lone surrogate as a JSON escape: the client decodes it as is.
    server.reply_text = "bad \udcff answer"
    with genai_mlflow.persona(persona_name):
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "bad \udcff answer"
    assert handle.flush(60)

    mlflow = mlflow_env.client()
    experiment = mlflow.get_experiment_by_name(f"{persona_name}_{TODAY}")
    assert experiment is not None
    [run] = mlflow.search_runs([experiment.experiment_id])
    found = _trace_of(mlflow, experiment.experiment_id, run)
    attributes = _llm_span_attributes(found)
    assert "gen_ai.output.messages" in attributes, "the answer was dropped"
    [message] = _json(attributes["gen_ai.output.messages"])
    assert message["parts"][0]["content"] == "bad \ufffd answer"
    assert found.info.response_preview == "bad \ufffd answer"


# --- more than 100 params ------------------------------------------------------------------------


def test_more_than_100_params_land_as_100_with_a_truncation_tag(
    handle: Handle, client: openai.OpenAI, mlflow_env: MlflowStack, persona_name: str
):
    """MLflow takes at most 100 params per run. One call of the openai client cannot pass that many
    (``metadata`` and ``logit_bias`` are one param each, ``extra_body`` none), but a trace can: here
    the call shares it with an agent framework's own GenAI span that records 120 settings."""
    settings = 120
    with genai_mlflow.persona(persona_name), tracer.start_as_current_span("plan") as root:
        _ask(
            client,
            "plan my day",
            temperature=0.2,
            top_p=0.9,
            max_tokens=64,
            seed=7,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            logit_bias={"50256": -100},
            metadata={f"key_{i}": f"value {i}" for i in range(16)},
            user="user-1",
            store=False,
        )
        with tracer.start_as_current_span("chat planner-model", kind=SpanKind.CLIENT) as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            span.set_attribute("gen_ai.provider.name", "planner")
            span.set_attribute("gen_ai.request.model", "planner-model")
            for i in range(settings):
                span.set_attribute(f"gen_ai.request.setting_{i:03d}", i)
    assert handle.flush(60)

    mlflow = mlflow_env.client()
    experiment = mlflow.get_experiment_by_name(f"{persona_name}_{TODAY}")
    assert experiment is not None
    run = _run_of(mlflow, experiment.experiment_id, format(root.get_span_context().trace_id, "032x"))
    params = run.data.params
    assert len(params) == 100
    dropped = int(run.data.tags["genai_mlflow.params_truncated"])
    assert dropped >= settings + 3 - 100
    # The most useful ones are kept; where the two calls differ the param says so.
    assert params["model"] == "mixed"
    assert params["operation"] == "chat"
    assert params["request.temperature"] == "mixed"
    assert run.data.metrics["llm_calls"] == 2
    # Nothing is lost: every setting is still on its span in the trace.
    found = _trace_of(mlflow, experiment.experiment_id, run)
    [planner] = [s for s in found.data.spans if s.name == "chat planner-model"]
    assert all(f"gen_ai.request.setting_{i:03d}" in planner.attributes for i in range(settings))
