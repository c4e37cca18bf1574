"""pytest fixtures for the real MLflow stack (``tests/mlflow_stack.py``, on ``genai_mlflow.stack``).

To use them in a test module or a conftest, either import them::

    from tests.stack_fixtures import mlflow_env, mlflow_server  # noqa: F401

or register this module as a plugin in the root ``tests/conftest.py``::

    pytest_plugins = ["tests.stack_fixtures"]

``mlflow_server`` is session-scoped: one PostgreSQL database, one S3 server and one ``mlflow server``
for the whole session (start ~10 s, stop ~2-3 s). Tests share it, so they must create their own
experiments (unique names) rather than assume an empty server. A test that stops the server should use
``with mlflow_server.outage(): ...``, which restarts it even if the test fails; ``mlflow_env`` also
restarts it if an earlier test left it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.mlflow_stack import MlflowStack, mlflow_stack


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowStack]:
    """A running MLflow server (PostgreSQL backend, S3 artifacts), torn down after the session."""
    with mlflow_stack(tmp_path_factory.mktemp("mlflow-stack")) as stack:
        yield stack


@pytest.fixture
def mlflow_env(mlflow_server: MlflowStack, monkeypatch: pytest.MonkeyPatch) -> MlflowStack:
    """``mlflow_server`` with its client environment applied to ``os.environ`` for this test only.

    Sets ``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and ``NO_PROXY``/``no_proxy``; undone after the test.
    A tracking URI set with ``mlflow.set_tracking_uri()`` elsewhere takes precedence over the variable.
    """
    if not mlflow_server.running:
        mlflow_server.start_mlflow()
    for key, value in mlflow_server.env.items():
        monkeypatch.setenv(key, value)
    return mlflow_server
