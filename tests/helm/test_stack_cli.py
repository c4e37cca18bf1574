"""``genai-mlflow stack up|down``: the local mirror of the chart comes up, answers, and goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from genai_mlflow import stack

ADMIN_URL = stack.default_pg_url()


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "genai_mlflow.cli", "stack", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


@pytest.fixture
def stack_args(tmp_path: Path) -> Iterator[list[str]]:
    try:
        psycopg.connect(ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {ADMIN_URL}: {exc}")
    database = f"genai_mlflow_stacktest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    state_dir = tmp_path / "stack"
    args = [
        "--state-dir", str(state_dir),
        "--pg-url", ADMIN_URL,
        "--database", database,
        "--mlflow-port", "0",
        "--s3-port", "0",
        "--collector-port", "0",
        "--workers", "1",
    ]  # fmt: skip
    try:
        yield args
    finally:
        if (state_dir / stack.STATE_FILE).exists():
            _cli("down", *args)
        stack.drop_database(ADMIN_URL, database)


def test_stack_up_serves_mlflow_s3_and_the_collector_then_down_stops_them(stack_args: list[str]) -> None:
    state_dir = Path(stack_args[stack_args.index("--state-dir") + 1])
    database = stack_args[stack_args.index("--database") + 1]

    up = _cli("up", *stack_args)
    assert up.returncode == 0, up.stdout + up.stderr
    state = stack.StackState.load(state_dir / stack.STATE_FILE)
    assert f"export MLFLOW_TRACKING_URI={state.mlflow_url}" in up.stdout

    # MLflow on PostgreSQL, its schema migrated before it served.
    assert _get(f"{state.mlflow_url}/health") == (200, "OK")
    with psycopg.connect(ADMIN_URL.rsplit("/", 1)[0] + f"/{database}") as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)
    # Configured as the chart configures it.
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{state.services['mlflow'].pid}/environ").read_text().split("\0")
        if "=" in item
    )
    assert environ["MLFLOW_MODEL_CATALOG_URI"] == ""
    assert environ["MLFLOW_S3_ENDPOINT_URL"] == state.s3_endpoint
    command = state.services["mlflow"].command
    assert "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1] == f"s3://{state.bucket}/artifacts"

    # The S3 API, with the artifact bucket.
    import boto3  # type: ignore[import-untyped]

    s3 = boto3.client(
        "s3",
        endpoint_url=state.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=state.s3_access_key,
        aws_secret_access_key=state.s3_secret_key,
    )
    assert state.bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    # The collector, where this genai-mlflow has one.
    if "collector" in state.services:
        assert state.collector_url is not None
        assert _get(f"{state.collector_url}/healthz")[0] == 200
        ready: dict[str, Any] = json.loads(_get(f"{state.collector_url}/readyz")[1])
        assert ready["ready"] is True

    status = _cli("status", *stack_args)
    assert status.returncode == 0, status.stdout

    # A second `up` on the same state refuses, and names the way out.
    again = _cli("up", *stack_args)
    assert again.returncode == 1
    assert "already running" in again.stderr and "stack down" in again.stderr

    down = _cli("down", *stack_args)
    assert down.returncode == 0, down.stderr
    assert not (state_dir / stack.STATE_FILE).exists()
    for service in state.services.values():
        assert not stack.is_running(service), service.name
        assert not stack._port_in_use(service.port), service.name
    assert _cli("status", *stack_args).returncode == 1


def test_down_without_a_stack_says_so(tmp_path: Path) -> None:
    result = _cli("down", "--state-dir", str(tmp_path), timeout=60)
    assert result.returncode == 0
    assert "no stack recorded" in result.stdout


def test_up_without_postgresql_fails_clearly_and_starts_nothing(tmp_path: Path) -> None:
    result = _cli(
        "up", "--state-dir", str(tmp_path), "--pg-url", "postgresql://postgres@127.0.0.1:1/postgres",
        "--mlflow-port", "0", "--s3-port", "0", "--collector-port", "0",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot reach PostgreSQL at postgresql://postgres@127.0.0.1:1/postgres" in result.stderr
    assert not (tmp_path / stack.STATE_FILE).exists()


def test_a_recycled_pid_is_not_taken_for_a_service() -> None:
    me = stack.Service("x", os.getpid(), stack._proc_start_time(os.getpid()) or 0, 1, "", "", [])
    assert stack.is_running(me)
    assert not stack.is_running(stack.Service("x", os.getpid(), me.start_time + 1, 1, "", "", []))
