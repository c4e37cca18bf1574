"""The pipeline's other ways in and modes: window, embedded store, launcher, helpers, switches."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest
from mlflow import MlflowClient
from opentelemetry import context, trace

import genai_mlflow
from genai_mlflow.stack import free_port
from genai_mlflow.testing.openai_server import OpenAIServer
from genai_mlflow.tracking import MLflowExperimentTracker, chat_with_tracking, track_llm_call
from tests.mlflow_stack import MlflowStack

TODAY = datetime.now(UTC).strftime("%Y-%m-%d")


def _runs(client: MlflowClient, persona: str):
    experiment = client.get_experiment_by_name(f"{persona}_{TODAY}")
    assert experiment is not None
    return experiment, client.search_runs([experiment.experiment_id])


def test_window_mode_makes_one_run_per_persona_model_and_hour(
    mlflow_env: MlflowStack, spool_dir: Path, client: openai.OpenAI, persona_name: str
):
    handle = genai_mlflow.instrument(mlflow_env.tracking_uri, mode="window", spool_dir=str(spool_dir))
    try:
        models = set()
        with genai_mlflow.persona(persona_name):
            for _ in range(12):
                small_model = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                ).model
            for _ in range(3):
                models.add(
                    client.chat.completions.create(
                        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                    ).model
                )
        models.add(small_model)
        assert handle.flush(60)
    finally:
        handle.shutdown()
    mlflow = mlflow_env.client()
    experiment, runs = _runs(mlflow, persona_name)
    by_model = {run.data.tags["model"]: run for run in runs}
    assert len(runs) == 2
    assert set(by_model) == models
    small = by_model[small_model]
    hour = datetime.now(UTC).strftime("%Y-%m-%dT%H")
    assert small.data.tags["genai_mlflow.window"].endswith(hour)
    assert small.data.tags["genai_mlflow.window"].startswith(persona_name + "|")
    history = mlflow.get_metric_history(small.info.run_id, "total_tokens")
    assert len(history) == 12
    assert sorted(m.step for m in history) == list(range(12))
    assert small.data.metrics["llm_calls_sum"] == 12
    assert small.data.metrics["total_tokens_sum"] == sum(m.value for m in history)
    traces = mlflow.search_traces(locations=[experiment.experiment_id], run_id=small.info.run_id)
    assert len(traces) == 12


def test_embedded_default_store(
    tmp_path: Path, server: OpenAIServer, monkeypatch: pytest.MonkeyPatch, persona_name: str
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    handle = genai_mlflow.instrument(spool_dir=str(tmp_path / "spool"), app_version="v1.2.3")
    try:
        assert handle.settings is not None
        assert handle.settings.tracking_uri.startswith("sqlite:")
        assert handle.settings.tracking_uri.endswith("mlflow.db")
        with genai_mlflow.persona(persona_name):
            openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Embedded?"}]
            )
        assert handle.flush(60)
    finally:
        handle.shutdown()
    assert (tmp_path / "mlflow.db").exists()
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment, [run] = _runs(mlflow, persona_name)
    assert run.data.metrics["llm_calls"] == 1
    assert run.data.tags["genai_mlflow.app_version"] == "v1.2.3"
    [found] = mlflow.search_traces(locations=[experiment.experiment_id], run_id=run.info.run_id)
    assert found.info.request_preview == "Embedded?"


def test_instrument_is_idempotent_and_restartable(
    mlflow_env: MlflowStack, spool_dir: Path, caplog: pytest.LogCaptureFixture
):
    first = genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir))
    try:
        assert genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir)) is first
        assert (
            genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir), mode="window") is first
        )
        assert "other arguments" in caplog.text
    finally:
        first.shutdown()
    second = genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir), mode="window")
    try:
        assert second is not first
        assert second.settings is not None and second.settings.mode == "window"
    finally:
        second.shutdown()


def test_kill_switch(monkeypatch: pytest.MonkeyPatch, server: OpenAIServer, tmp_path: Path):
    from openai.resources.chat.completions import Completions

    monkeypatch.setenv("GENAI_MLFLOW_DISABLED", "true")
    original = Completions.__dict__["create"]
    handle = genai_mlflow.instrument(f"sqlite:///{tmp_path}/x.db", spool_dir=str(tmp_path / "spool"))
    try:
        assert handle.settings is None
        assert Completions.__dict__["create"] is original  # nothing patched
        assert handle.flush(1)
    finally:
        handle.shutdown()
    assert not (tmp_path / "spool").exists()
    assert not (tmp_path / "x.db").exists()


def test_wrong_setting_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ValueError, match="GENAI_MLFLOW_MODE='hourly' is not one of call, window"):
        genai_mlflow.instrument(f"sqlite:///{tmp_path}/x.db", mode="hourly")
    with pytest.raises(ValueError, match="unknown option"):
        genai_mlflow.instrument(f"sqlite:///{tmp_path}/x.db", spool_folder="x")


def test_seed_compatible_helpers(
    mlflow_env: MlflowStack, spool_dir: Path, server: OpenAIServer, client: openai.OpenAI, persona_name: str
):
    handle = genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir))
    try:
        tracker = MLflowExperimentTracker()
        assert (
            tracker.track_llm_call(persona_name, "gpt-4o-mini", "Old prompt", "Old answer", 11, 7, 250.0)
            is None
        )

        @track_llm_call(persona_id=persona_name)
        def instrumented_inside() -> str:
            answer = client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
            return answer.choices[0].message.content or ""

        @track_llm_call(persona_id=persona_name)
        async def manual_inside() -> dict[str, object]:
            return {
                "model": "gpt-4o-mini",
                "prompt": "p",
                "response": "r",
                "prompt_tokens": 3,
                "completion_tokens": 2,
            }

        instrumented_inside()
        import asyncio

        asyncio.run(manual_inside())
        text = chat_with_tracking("gpt-4o-mini", "Hello there", persona_name, client=client)
        assert text
        assert handle.flush(60)
    finally:
        handle.shutdown()
    mlflow = mlflow_env.client()
    _, runs = _runs(mlflow, persona_name)
    assert (
        len(runs) == 4
    )  # one each: tracker, decorator over an instrumented call, manual, chat_with_tracking
    by_tokens = {
        (r.data.metrics.get("prompt_tokens"), r.data.metrics.get("completion_tokens")): r for r in runs
    }
    tracked = by_tokens[(11.0, 7.0)]
    assert tracked.data.params["model"] == "gpt-4o-mini"
    assert tracked.data.metrics["latency_ms"] == pytest.approx(250.0, abs=1)
    assert (3.0, 2.0) in by_tokens


APP = textwrap.dedent(
    """
    import sys
    import openai
    import genai_mlflow

    # An app that also makes the one-line call: under the launcher it must find the pipeline there.
    handle = genai_mlflow.instrument()
    client = openai.OpenAI(base_url=sys.argv[1], api_key="k", max_retries=0)
    with genai_mlflow.persona(sys.argv[2]):
        messages = [{"role": "user", "content": "zero code"}]
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    print("made the call", handle.flush(30))
    """
)


def test_launcher_with_no_flags_lands_in_mlflow(
    mlflow_env: MlflowStack, server: OpenAIServer, tmp_path: Path, persona_name: str
):
    app = tmp_path / "app.py"
    app.write_text(APP)
    env = {**os.environ, "GENAI_MLFLOW_SPOOL_DIR": str(tmp_path / "spool")}
    for variable in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_LOGS_EXPORTER"):
        env.pop(variable, None)
    launcher = Path(sys.executable).with_name("opentelemetry-instrument")
    done = subprocess.run(
        [str(launcher), sys.executable, str(app), server.base_url, persona_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "made the call True" in done.stdout
    mlflow = mlflow_env.client()
    deadline = time.monotonic() + 30  # landed at exit; allow the server to settle
    while time.monotonic() < deadline:
        experiment = mlflow.get_experiment_by_name(f"{persona_name}_{TODAY}")
        if experiment is not None and mlflow.search_runs([experiment.experiment_id]):
            break
        time.sleep(0.5)
    experiment, [run] = _runs(mlflow, persona_name)
    [found] = mlflow.search_traces(locations=[experiment.experiment_id], run_id=run.info.run_id)
    assert found.info.request_preview == "zero code"  # content is on under the distro
    spans = json.dumps([s.to_dict() for s in found.data.spans])
    assert "gen_ai.input.messages" in spans


def test_writer_in_a_process_of_its_own(
    mlflow_env: MlflowStack, spool_dir: Path, client: openai.OpenAI, persona_name: str
):
    handle = genai_mlflow.instrument(
        mlflow_env.tracking_uri, spool_dir=str(spool_dir), writer="process", app_version="v9"
    )
    try:
        pipeline = handle.pipeline
        assert pipeline is not None and pipeline.drain_process is not None
        with genai_mlflow.persona(persona_name):
            for _ in range(3):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
        assert handle.flush(60)
        assert pipeline.spool.status().drain_locked_by_other  # the drain process, not this one
        assert not pipeline.writer.draining
    finally:
        handle.shutdown()
    _, runs = _runs(mlflow_env.client(), persona_name)
    assert len(runs) == 3
    # The writer process got every setting, not only the URI and the spool.
    assert {run.data.tags.get("genai_mlflow.app_version") for run in runs} == {"v9"}
    assert pipeline.drain_process.wait(timeout=30) == 0  # it exits once its parent's pipeline is gone


def test_flush_and_shutdown_honour_their_timeouts(tmp_path: Path, client: openai.OpenAI, persona_name: str):
    handle = genai_mlflow.instrument(f"http://127.0.0.1:{free_port()}", spool_dir=str(tmp_path / "spool"))
    try:
        with genai_mlflow.persona(persona_name):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        started = time.monotonic()
        assert handle.flush(1.0) is False  # nothing can land: no server there
        assert time.monotonic() - started < 2.0
    finally:
        started = time.monotonic()
        assert handle.shutdown(timeout_s=1.0) is False
        assert time.monotonic() - started < 3.0


EXPORTER_APP = textwrap.dedent(
    """
    import sys
    import openai
    from opentelemetry import trace
    from opentelemetry.sdk._configuration import _initialize_components
    from genai_mlflow import OpenAIInstrumentor, persona

    # What another distro's configurator does with `--traces_exporter mlflow`: the SDK loads the
    # exporter by its entry point name, behind a BatchSpanProcessor.
    _initialize_components(trace_exporter_names=["mlflow"])
    OpenAIInstrumentor().instrument()
    client = openai.OpenAI(base_url=sys.argv[1], api_key="k", max_retries=0)
    with persona(sys.argv[2]):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    print("flushed", trace.get_tracer_provider().force_flush(30000))
    trace.get_tracer_provider().shutdown()
    """
)


def test_traces_exporter_mlflow_beside_another_configurator(
    mlflow_env: MlflowStack, server: OpenAIServer, tmp_path: Path, persona_name: str
):
    app = tmp_path / "app.py"
    app.write_text(EXPORTER_APP)
    env = {
        **os.environ,
        "GENAI_MLFLOW_SPOOL_DIR": str(tmp_path / "spool"),
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    done = subprocess.run(
        [sys.executable, str(app), server.base_url, persona_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "flushed True" in done.stdout
    _, [run] = _runs(mlflow_env.client(), persona_name)
    assert run.data.metrics["llm_calls"] == 1


@pytest.mark.parametrize("mode", ["call", "window"])
def test_a_call_after_its_trace_landed_is_dropped_and_said(
    mlflow_env: MlflowStack,
    spool_dir: Path,
    client: openai.OpenAI,
    persona_name: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
):
    handle = genai_mlflow.instrument(mlflow_env.tracking_uri, mode=mode, spool_dir=str(spool_dir))
    assert handle.pipeline is not None
    tracer = trace.get_tracer("app")
    try:
        with genai_mlflow.persona(persona_name):
            with tracer.start_as_current_span("request") as request:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            assert handle.flush(60)
            # A task the request left behind calls the model once the request's trace has landed.
            token = context.attach(trace.set_span_in_context(request))
            try:
                with caplog.at_level(logging.WARNING, logger="genai_mlflow.exporter"):
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": "later"}]
                    )
                    assert handle.flush(60)
            finally:
                context.detach(token)
        assert handle.pipeline.writer.late_spans == 1
    finally:
        handle.shutdown()
    trace_id = format(request.get_span_context().trace_id, "032x")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "dropped 1 span(s), 1 of them LLM call(s), that came after their trace had landed" in w
        and trace_id in w
        for w in warnings
    ), warnings
    mlflow = mlflow_env.client()
    experiment, runs = _runs(mlflow, persona_name)
    assert len(runs) == 1
    (landed,) = mlflow.search_traces(locations=[experiment.experiment_id])
    assert sorted(span.name for span in landed.data.spans) == ["chat gpt-4o-mini", "request"]
