"""The MLflow pods' entry point (helm/genai-mlflow/files/mlflow-entrypoint.py), run here as the pods
run it: ``serve`` builds the server's command line, ``migrate`` brings a PostgreSQL database to the
current schema, and replicas migrating at the same moment take turns."""

from __future__ import annotations

import configparser
import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest

from genai_mlflow import stack
from tests.helm.chart import CHART_DIR

SCRIPT = CHART_DIR / "files" / "mlflow-entrypoint.py"


@pytest.fixture(scope="module")
def entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mlflow_entrypoint", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**overrides: str) -> dict[str, str]:
    env = {
        "DB_HOST": "genai-mlflow-postgresql",
        "DB_PORT": "5432",
        "DB_NAME": "mlflow",
        "DB_USER": "mlflow",
        "DB_PASSWORD": "p@ss:w/rd%?#",
        "DB_SSLMODE": "disable",
        "MLFLOW_PORT": "5000",
        "MLFLOW_WORKERS": "2",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts",
        "MLFLOW_ALLOWED_HOSTS": "genai-mlflow-mlflow,genai-mlflow-mlflow:*",
        "MLFLOW_EXTRA_ARGS": '["--gunicorn-opts-not-used", 7]',
        "AUTH_ENABLED": "false",
    }
    env.update(overrides)
    return env


def test_database_uri_quotes_any_password(entrypoint: Any) -> None:
    from sqlalchemy.engine import make_url

    uri = entrypoint.sqlalchemy_uri(_env(), "mlflow")
    url = make_url(uri)
    assert url.drivername == "postgresql+psycopg"
    assert url.password == "p@ss:w/rd%?#"
    assert (url.host, url.port, url.database, url.username) == (
        "genai-mlflow-postgresql",
        5432,
        "mlflow",
        "mlflow",
    )
    assert url.query["sslmode"] == "disable"


def test_serve_runs_mlflow_with_proxied_artifacts_and_keeps_the_password_out_of_argv(entrypoint: Any) -> None:
    cmd, env = entrypoint.server_command(_env())
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    joined = " ".join(cmd)
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://mlflow/artifacts"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--workers") + 1] == "2"
    assert cmd[cmd.index("--allowed-hosts") + 1] == "genai-mlflow-mlflow,genai-mlflow-mlflow:*"
    assert cmd[-2:] == ["--gunicorn-opts-not-used", "7"]
    assert "p%40ss" not in joined and "--backend-store-uri" not in cmd
    assert env["MLFLOW_BACKEND_STORE_URI"] == entrypoint.sqlalchemy_uri(_env(), "mlflow")
    assert "--app-name" not in cmd


def test_serve_with_basic_auth_writes_its_config(
    entrypoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = tmp_path / "auth" / "basic_auth.ini"
    monkeypatch.setattr(entrypoint, "AUTH_CONFIG_PATH", str(config_path))
    env = _env(AUTH_ENABLED="true", AUTH_DB_NAME="mlflow_auth", AUTH_DEFAULT_PERMISSION="EDIT")
    cmd, out_env = entrypoint.server_command(env)
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert out_env["MLFLOW_AUTH_CONFIG_PATH"] == str(config_path)
    assert config_path.stat().st_mode & 0o777 == 0o600
    parsed = configparser.ConfigParser()  # MLflow reads it this way, interpolation included
    parsed.read(config_path)
    assert parsed["mlflow"]["database_uri"] == entrypoint.sqlalchemy_uri(env, "mlflow_auth")
    assert parsed["mlflow"]["default_permission"] == "EDIT"
    assert "admin_password" not in parsed["mlflow"], "the password comes from MLFLOW_AUTH_ADMIN_PASSWORD"


def test_usage_error_without_a_known_command() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "dance"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "usage" in proc.stderr


# ------------------------------------------------------------------------------- against PostgreSQL


@pytest.fixture
def database() -> Any:
    admin_url = stack.default_pg_url()
    try:
        psycopg.connect(admin_url, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {admin_url}: {exc}")
    name = f"genai_mlflow_helm_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    stack.ensure_database(admin_url, name)
    conninfo = psycopg.conninfo.conninfo_to_dict(admin_url)
    try:
        yield name, conninfo
    finally:
        stack.drop_database(admin_url, name)
        stack.drop_database(admin_url, f"{name}_auth")


def _db_env(name: str, conninfo: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        DB_HOST=str(conninfo.get("host", "127.0.0.1")),
        DB_PORT=str(conninfo.get("port", "5432")),
        DB_NAME=name,
        DB_USER=str(conninfo.get("user", "postgres")),
        DB_PASSWORD=str(conninfo.get("password", "")),
        DB_SSLMODE="disable",
        DB_WAIT_TIMEOUT="30",
        AUTH_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    return env


def test_replicas_migrating_together_take_turns_and_reach_head(database: tuple[str, dict[str, Any]]) -> None:
    """Two MLflow pods starting on an empty database at once: both init containers succeed, one
    after the other (advisory lock), and the schema ends at MLflow's head revision."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    name, conninfo = database
    env = _db_env(name, conninfo)
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(outputs)
    for out in outputs:
        assert "holding the migration lock" in out and "schema is current" in out
    with psycopg.connect(**conninfo | {"dbname": name}) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert row is not None and row[0] == _get_latest_schema_revision()
    # The second of the two ran on an up-to-date schema: what every later upgrade's new pods do.


def test_migrate_creates_the_auth_database_when_missing(
    entrypoint: Any, database: tuple[str, dict[str, Any]]
) -> None:
    name, conninfo = database
    env = _db_env(name, conninfo)
    entrypoint.ensure_database(env, f"{name}_auth")
    entrypoint.ensure_database(env, f"{name}_auth")  # idempotent
    with psycopg.connect(**conninfo | {"dbname": f"{name}_auth"}) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_migrate_gives_up_on_an_unreachable_database_with_a_clear_message() -> None:
    env = _db_env("mlflow", {"host": "127.0.0.1", "port": "1", "user": "nobody"})
    env["DB_WAIT_TIMEOUT"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert "did not accept connections in time" in proc.stderr
