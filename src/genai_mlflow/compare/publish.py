"""Logs a comparison to MLflow as a run of its own, in ``<persona>_comparisons``: never among the
persona's calls, so that it is never counted as one."""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from genai_mlflow import semconv as sc

COMPARISONS_SUFFIX = "_comparisons"
# Metric and param keys: MLflow allows word characters and "/ . - space :"; a group such as
# "greeting/1" keeps its slash, anything else becomes "_".
_UNSAFE_KEY_CHARS = re.compile(r"[^\w./\- ]")


def comparisons_experiment(persona: str) -> str:
    return persona + COMPARISONS_SUFFIX


def metric_key(*parts: str) -> str:
    return _UNSAFE_KEY_CHARS.sub("_", ".".join(parts))[:250]


def log_comparison(
    tracking_uri: str,
    persona: str,
    run_name: str,
    params: Mapping[str, str],
    metrics: Mapping[str, float],
    files: Mapping[str, str | bytes],
) -> tuple[str, str]:
    """The run's experiment and run ids. ``files`` are artifacts by name (text or bytes)."""
    from mlflow import MlflowClient
    from mlflow.entities import LifecycleStage, Metric, Param

    client = MlflowClient(tracking_uri)
    name = comparisons_experiment(persona)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # Not tagged genai_mlflow.persona: the comparison reader must never take it for calls.
        experiment_id = client.create_experiment(name, tags={sc.GENAI_MLFLOW_COMPARISON_OF: persona})
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == LifecycleStage.DELETED:
            client.restore_experiment(experiment_id)
    run = client.create_run(experiment_id, run_name=run_name, tags={sc.GENAI_MLFLOW_COMPARISON_OF: persona})
    run_id = run.info.run_id
    try:
        client.log_batch(
            run_id,
            params=[Param(k, v[:6000]) for k, v in params.items()],
            metrics=[Metric(k, float(v), run.info.start_time, 0) for k, v in metrics.items()],
        )
        with tempfile.TemporaryDirectory() as folder:
            for file_name, content in files.items():
                path = Path(folder) / file_name
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content, encoding="utf-8")
                client.log_artifact(run_id, str(path))
    except Exception:
        _end(client, run_id, "FAILED")
        raise
    _end(client, run_id, "FINISHED")
    return experiment_id, run_id


def _end(client: Any, run_id: str, status: str) -> None:
    # MLflow prints the run's URL on stdout, which must hold only the comparison (--format json).
    with contextlib.redirect_stdout(sys.stderr):
        client.set_terminated(run_id, status)
