"""A real collector (``genai-mlflow collector`` in a subprocess) writing to the real MLflow stack."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pytest
import requests

from genai_mlflow import stack
from tests.mlflow_stack import MlflowStack
from tests.stack_fixtures import mlflow_env, mlflow_server

__all__ = ["mlflow_env", "mlflow_server"]  # the stack's fixtures, for every test in this folder

TOKEN = "collector-test-token"
MAX_BODY_BYTES = 1 << 20
STARTUP_TIMEOUT_S = 60.0


@dataclass
class CollectorProcess:
    child: stack.Child
    token: str | None = TOKEN

    @property
    def url(self) -> str:
        return self.child.url

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
        return self.child.running and self.get("/healthz").status_code == 200

    def log(self) -> str:
        log_path = Path(self.child.service.log)
        return log_path.read_text(errors="replace") if log_path.exists() else ""


def start_collector(
    mlflow_stack: MlflowStack,
    workdir: Path,
    *args: str,
    token: str | None = TOKEN,
    env: dict[str, str] | None = None,
) -> CollectorProcess:
    """``genai-mlflow collector`` (the stack's own launcher) on 127.0.0.1, a 1 MiB body limit and ``args``."""
    child = stack.start_collector(
        mlflow_stack.tracking_uri,
        spool_dir=workdir / "spool",
        log_path=workdir / "collector.log",
        token=token,
        args=["--host", "127.0.0.1", "--max-body-bytes", str(MAX_BODY_BYTES), *args],
        env={**mlflow_stack.env, **(env or {})},
        timeout=STARTUP_TIMEOUT_S,
    )
    return CollectorProcess(child, token)


def stop_collector(collector: CollectorProcess, timeout_s: float = 30.0) -> int | None:
    """SIGTERM, SIGKILL after ``timeout_s``; its exit status."""
    return collector.child.stop(timeout_s)


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
