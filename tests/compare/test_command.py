"""``genai-mlflow compare`` end to end: calls with known figures land through the pipeline, the
command reads them back from MLflow (the real server, and the embedded store), and its verdicts,
intervals and logged run say what the data holds."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from genai_mlflow import semconv as sc
from genai_mlflow.cli import main
from tests.mlflow_stack import MlflowStack
from tests.stack_fixtures import mlflow_env, mlflow_server

from . import synthetic

__all__ = ["mlflow_env", "mlflow_server"]

N = 150  # calls per prompt version
HOUR_NS = 3600 * 1_000_000_000


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the embedded store, MLflow puts artifacts (the comparison's) under ./mlruns."""
    monkeypatch.chdir(tmp_path)


def _versions(prompt: str, version: int) -> dict[str, str]:
    return {
        sc.GENAI_MLFLOW_PROMPTS: f"{prompt}/{version}",
        sc.GENAI_MLFLOW_PROMPT_NAME: prompt,
        sc.GENAI_MLFLOW_PROMPT_VERSION: str(version),
    }


def _known_difference(persona: str) -> tuple[list[synthetic.Call], dict[str, float]]:
    """v2 answers with 60 more tokens on average and is 25% slower at the median; both fail 2%."""
    rng = np.random.default_rng(7)
    start = time.time_ns() - 2 * HOUR_NS
    v1 = synthetic.calls(
        rng,
        N,
        start_ns=start,
        labels=_versions("greeting", 1),
        output_mean=200,
        latency_median_ms=800,
        error_rate=0.02,
    )
    v2 = synthetic.calls(
        rng,
        N,
        start_ns=start + 500_000_000,
        labels=_versions("greeting", 2),
        output_mean=260,
        latency_median_ms=1000,
        error_rate=0.02,
    )
    unlabelled = synthetic.calls(rng, 5, start_ns=start, labels={}, output_mean=10, latency_median_ms=100)
    truth = {"output_tokens.mean": 60.0, "latency_ms.p50": 200.0}
    return [*v1, *v2, *unlabelled], truth


def _compare(uri: str, persona: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    code = main(["--tracking-uri", uri, "compare", "--persona", persona, "--format", "json", *args])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {"stderr": captured.err}


def _check_known_difference(uri: str, persona: str, spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made, truth = _known_difference(persona)
    synthetic.land(uri, spool, persona, made)
    code, result = _compare(uri, persona, capsys, "--since", "1d")
    assert code == 0, result
    assert [g["group"] for g in result["groups"]] == ["greeting/1", "greeting/2"]
    assert [g["calls"] for g in result["groups"]] == [N, N]
    assert result["baseline"] == "greeting/1"
    assert result["unlabelled_calls"] == 5
    by_metric = {d["metric"]: d for d in result["differences"]}
    # What the data holds, computed from the calls themselves.
    v1 = [c for c in made if c.labels.get(sc.GENAI_MLFLOW_PROMPT_VERSION) == "1"]
    v2 = [c for c in made if c.labels.get(sc.GENAI_MLFLOW_PROMPT_VERSION) == "2"]
    observed = float(np.mean([c.output_tokens for c in v2]) - np.mean([c.output_tokens for c in v1]))
    tokens = by_metric["output_tokens.mean"]
    assert tokens["absolute"] == pytest.approx(observed)
    for metric, true_difference in truth.items():
        difference = by_metric[metric]
        assert difference["significant"], difference
        assert difference["verdict"].startswith("higher")
        low, high = difference["ci"]
        assert low <= true_difference <= high, (metric, difference)
    assert not by_metric["error_rate"]["significant"]
    assert "no clear difference" in by_metric["error_rate"]["verdict"]
    assert "not enough data yet" in by_metric["ttft_ms.p50"]["verdict"]  # nothing was streamed
    assert result["summary_verdict"].startswith("greeting/2 is worse than greeting/1")

    # The comparison was logged, in its own experiment, with the table and the chart.
    logged = result["mlflow_run"]
    assert logged["experiment_name"] == f"{persona}_comparisons"
    client = MlflowClient(uri)
    run = client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["by"] == "prompt_version"
    assert run.data.params["groups"] == "greeting/1,greeting/2"
    assert run.data.metrics["greeting/1.calls"] == N
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"comparison.json", "comparison.png", "comparison.txt"}
    png = Path(client.download_artifacts(run.info.run_id, "comparison.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ...and it is not counted among the persona's calls: comparing again reads the same calls.
    code, again = _compare(uri, persona, capsys, "--since", "1d", "--no-log")
    assert code == 0 and [g["calls"] for g in again["groups"]] == [N, N]
    assert again["mlflow_run"] is None


def test_compare_on_the_server_finds_the_difference_the_data_holds(
    mlflow_env: MlflowStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    _check_known_difference(
        mlflow_env.tracking_uri, f"cmp_{uuid.uuid4().hex[:8]}", tmp_path / "spool", capsys
    )


def test_compare_on_the_embedded_store_finds_the_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _check_known_difference(f"sqlite:///{tmp_path / 'mlflow.db'}", "cmp_embedded", tmp_path / "spool", capsys)


def test_an_aa_test_reports_no_difference(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(11)
    start = time.time_ns() - HOUR_NS
    made = []
    for name in ("control", "treatment"):
        labels = {sc.GENAI_MLFLOW_AB_TEST: "tone", sc.GENAI_MLFLOW_VARIANT: name}
        made += synthetic.calls(
            rng, 120, start_ns=start, labels=labels, output_mean=200, latency_median_ms=800, error_rate=0.05
        )
    synthetic.land(uri, tmp_path / "spool", "aa", made)
    code, result = _compare(uri, "aa", capsys, "--by", "variant", "--no-log")
    assert code == 0, result
    assert result["test"] == "tone"
    assert [g["calls"] for g in result["groups"]] == [120, 120]
    assert not any(d["significant"] for d in result["differences"])
    assert result["summary_verdict"].startswith("No clear difference")


def test_text_output_reads_as_a_table_with_verdicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(3)
    start = time.time_ns() - HOUR_NS
    calls = synthetic.calls(rng, 40, start_ns=start, labels={}, output_mean=50, latency_median_ms=300)
    made = [replace(c, model=model) for model, c in zip(["gpt-4o-mini", "gpt-4o"] * 20, calls, strict=True)]
    synthetic.land(uri, tmp_path / "spool", "writer", made)
    assert main(["--tracking-uri", uri, "compare", "--persona", "writer", "--by", "model", "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "Persona 'writer', by model" in out
    assert "gpt-4o (baseline)" in out  # a tie in size: the first by name
    assert "gpt-4o-mini against gpt-4o:" in out
    assert "not enough data yet: 20 and 20 calls" in out
    assert out.rstrip().splitlines()[-1].startswith("Verdict:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--persona", "nobody"], "no experiment"),
        (["--persona", "writer", "--since", "yesterday"], "cannot read the time 'yesterday'"),
        (["--persona", "writer", "--since", "1d", "--until", "2d"], "must be before --until"),
        (["--persona", "writer", "--baseline", "nope"], "--baseline 'nope' is not a group"),
    ],
)
def test_bad_input_gets_a_precise_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(5)
    labels = _versions("greeting", 1)
    synthetic.land(
        uri,
        tmp_path / "spool",
        "writer",
        synthetic.calls(
            rng, 3, start_ns=time.time_ns() - HOUR_NS, labels=labels, output_mean=5, latency_median_ms=10
        ),
    )
    assert main(["--tracking-uri", uri, "compare", *args]) == 2
    assert message in capsys.readouterr().err
