"""A real collector (``genai-mlflow collector`` in a subprocess) writing to the real MLflow stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
import requests

from tests.mlflow_stack import MlflowStack, free_port
from tests.stack_fixtures import mlflow_env, mlflow_server

__all__ = ["mlflow_env", "mlflow_server"]  # the stack's fixtures, for every test in this folder

TOKEN = "collector-test-token"
MAX_BODY_BYTES = 1 << 20
STARTUP_TIMEOUT_S = 60.0


@dataclass
class CollectorProcess:
    url: str
    proc: subprocess.Popen[bytes]
    spool_dir: Path
    log_path: Path
    token: str | None = TOKEN

    def headers(self, content_type: str = "application/x-protobuf", **extra: str) -> dict[str, str]:
        headers = {"Content-Type": content_type, **extra}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def post(
        self, body: bytes, content_type: str = "application/x-protobuf", **headers: str
    ) -> requests.Response:
        return requests.post(
            self.url + "/v1/traces", data=body, headers=self.headers(content_type, **headers), timeout=30
        )

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 if absent)."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.get("/healthz").status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_collector(
    stack: MlflowStack,
    workdir: Path,
    *args: str,
    token: str | None = TOKEN,
    env: dict[str, str] | None = None,
) -> CollectorProcess:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    spool_dir = workdir / "spool"
    log_path = workdir / "collector.log"
    command = [
        sys.executable, "-m", "genai_mlflow.cli", "--tracking-uri", stack.tracking_uri, "collector",
        "--host", "127.0.0.1", "--port", str(port), "--spool-dir", str(spool_dir),
        "--max-body-bytes", str(MAX_BODY_BYTES), *args,
    ]  # fmt: skip
    if token:
        command += ["--token", token]
    process_env = {**os.environ, **stack.env, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=process_env)
    collector = CollectorProcess(f"http://127.0.0.1:{port}", proc, spool_dir, log_path, token)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the collector exited with {proc.returncode}:\n{collector.log()}")
        try:
            if collector.get("/healthz").status_code == 200:
                return collector
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    stop_collector(collector)
    raise RuntimeError(f"the collector did not start in {STARTUP_TIMEOUT_S} s:\n{collector.log()}")


def stop_collector(collector: CollectorProcess, timeout_s: float = 30.0) -> int:
    if collector.proc.poll() is None:
        collector.proc.send_signal(signal.SIGTERM)
        try:
            collector.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            collector.proc.kill()
            collector.proc.wait(5)
    return collector.proc.returncode


@pytest.fixture(scope="session")
def collector(
    mlflow_server: MlflowStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CollectorProcess]:
    """One collector for the session's tests, with a bearer token and a 1 MiB body limit."""
    running = start_collector(mlflow_server, tmp_path_factory.mktemp("collector"))
    yield running
    stop_collector(running)


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def wait_for_traces(
    stack: MlflowStack, experiment_name: str, count: int, timeout_s: float = 60.0
) -> list[mlflow.entities.Trace]:
    """The traces of an experiment once there are ``count`` of them (fails at the timeout)."""
    client = stack.client()
    deadline = time.monotonic() + timeout_s
    traces: list[mlflow.entities.Trace] = []
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            traces = list(client.search_traces(locations=[experiment.experiment_id], max_results=500))
            if len(traces) >= count:
                return traces
        time.sleep(0.25)
    raise AssertionError(f"{experiment_name}: {len(traces)} traces after {timeout_s} s, expected {count}")
