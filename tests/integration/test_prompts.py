"""Prompt versions, A/B variants and the app's version, as a user finds them in MLflow."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import openai
import pytest

import genai_mlflow
from genai_mlflow import semconv as sc
from tests.mlflow_stack import MlflowStack

TODAY = datetime.now(UTC).strftime("%Y-%m-%d")
QUESTION = [{"role": "user", "content": "Say hello"}]


def _ask(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)


@pytest.fixture
def prompt_name(mlflow_env: MlflowStack, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_env.tracking_uri)
    name = f"greeting_{uuid.uuid4().hex[:8]}"
    mlflow.genai.register_prompt(name, "Hello {{name}}!", commit_message="v1")
    mlflow.genai.register_prompt(name, "Hi {{name}}, how are you?", commit_message="v2")
    return name


def test_calls_carry_prompt_versions_variant_and_app_version_and_link_to_them(
    mlflow_env: MlflowStack, spool_dir: Path, client: openai.OpenAI, persona_name: str, prompt_name: str
):
    handle = genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir), app_version="v1.2.3")
    try:
        with genai_mlflow.persona(persona_name):
            with genai_mlflow.prompt(prompt_name, 1):
                _ask(client)
            with genai_mlflow.prompt("adhoc", 1):  # not in the registry: labelled, not linked
                _ask(client)
            loaded = mlflow.genai.load_prompt(f"prompts:/{prompt_name}/2")
            assert loaded.version == 2
            with genai_mlflow.variant("tone", ["short", "long"], key="alice") as chosen:
                _ask(client)  # carries the loaded prompt without extra code
        assert handle.flush(60)
    finally:
        handle.shutdown()

    client_ = mlflow_env.client()
    experiment = client_.get_experiment_by_name(f"{persona_name}_{TODAY}")
    assert experiment is not None
    exp_id = experiment.experiment_id
    runs = client_.search_runs([exp_id], order_by=["attributes.start_time ASC"])
    assert [run.data.params.get("prompts") for run in runs] == [
        f"{prompt_name}/1",
        "adhoc/1",
        f"{prompt_name}/2",
    ]
    assert [run.data.params.get("prompt.version") for run in runs] == ["1", "1", "2"]
    assert runs[2].data.params["variant"] == chosen.name
    assert runs[2].data.params["ab_test"] == "tone"
    assert {run.data.params["app_version"] for run in runs} == {"v1.2.3"}
    assert json.loads(runs[0].data.tags[sc.MLFLOW_LINKED_PROMPTS]) == [{"name": prompt_name, "version": "1"}]
    assert sc.MLFLOW_LINKED_PROMPTS not in runs[1].data.tags

    # Each registered version finds its traces the way MLflow's UI asks for them.
    for version, run in ((1, runs[0]), (2, runs[2])):
        found = client_.search_traces(locations=[exp_id], filter_string=f"prompt = '{prompt_name}/{version}'")
        assert [t.info.tags[sc.GENAI_MLFLOW_TRACE_ID] for t in found] == [
            run.data.tags[sc.GENAI_MLFLOW_TRACE_ID]
        ]
        (trace,) = found
        assert json.loads(trace.info.tags[sc.MLFLOW_LINKED_PROMPTS]) == [
            {"name": prompt_name, "version": str(version)}
        ]
    adhoc = client_.search_traces(locations=[exp_id], run_id=runs[1].info.run_id)
    assert sc.MLFLOW_LINKED_PROMPTS not in adhoc[0].info.tags
    assert adhoc[0].info.tags[sc.GENAI_MLFLOW_PROMPTS] == "adhoc/1"

    # The prompt shows in the experiment's Prompts tab (experiment-scoped, as load_prompt makes it).
    scoped = mlflow.genai.search_prompts(filter_string=f"experiment_id = '{exp_id}'")
    assert [p.name for p in scoped] == [prompt_name]

    # The app version's LoggedModel lists every trace, and linking it kept what the trace list shows.
    models = client_.search_logged_models(
        experiment_ids=[exp_id], filter_string="tags.`genai_mlflow.app_version` = 'v1.2.3'"
    )
    assert len(models) == 1
    traces = client_.search_traces(locations=[exp_id], model_id=models[0].model_id)
    assert len(traces) == 3
    for trace in traces:
        assert trace.info.tags[sc.GENAI_MLFLOW_APP_VERSION] == "v1.2.3"
        assert trace.info.request_preview == "Say hello"
        assert trace.info.token_usage and trace.info.token_usage["total_tokens"] > 0
        assert trace.info.state.value == "OK"
    linked_runs = {
        t.info.tags[sc.GENAI_MLFLOW_TRACE_ID]
        for run in runs
        for t in client_.search_traces(locations=[exp_id], run_id=run.info.run_id)
    }
    assert len(linked_runs) == 3  # each trace still linked to its run
