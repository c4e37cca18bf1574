"""Fixtures for tests against the real stack: MLflow (PostgreSQL, S3 on moto) and the OpenAI server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

import genai_mlflow
from genai_mlflow.setup import Handle
from genai_mlflow.testing.openai_server import OpenAIServer
from tests.mlflow_stack import MlflowStack
from tests.stack_fixtures import mlflow_env, mlflow_server

__all__ = ["mlflow_env", "mlflow_server"]  # the stack's fixtures, for every test in this folder


@pytest.fixture
def persona_name() -> str:
    """A persona of this test's own: tests share one MLflow server."""
    return f"tester_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def handle(mlflow_env: MlflowStack, spool_dir: Path) -> Iterator[Handle]:
    instrumented = genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir))
    yield instrumented
    instrumented.shutdown()


@pytest.fixture
def client(server: OpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="test-key", max_retries=0) as c:
        yield c
