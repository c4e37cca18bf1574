"""The tests' MLflow stack: the product's ``genai_mlflow.stack.LocalStack``, what ``genai-mlflow stack
up`` runs, on a PostgreSQL database of the test session's own.

``mlflow_stack(tmp_dir)`` starts, on free 127.0.0.1 ports:

1. S3: MinIO when a ``minio`` binary is on PATH, else ``moto_server`` (in memory), with a bucket;
2. a fresh database on the PostgreSQL server at ``GENAI_MLFLOW_STACK_PG_URL`` (default
   ``postgresql://postgres@127.0.0.1:5432/postgres``; trust auth), migrated by ``mlflow db upgrade``;
3. ``mlflow server`` (uvicorn, ``--workers 2``, lighter on CI than the local stack's 4) with that
   database as backend store and ``s3://<bucket>/artifacts`` as proxied artifact destination
   (``--serve-artifacts``).

Everything runs in its own process group and is torn down on exit, whatever happens in the ``with`` body:
the process groups are terminated (SIGTERM, then SIGKILL after a grace period), and the database is
dropped after its connections are terminated. As a last line of defence against the test process being
killed outright, the services get ``PR_SET_PDEATHSIG``, and the next session drops the databases that
killed sessions of this host left behind.

Client-side environment: nothing is written to ``os.environ``. ``MlflowStack.env`` holds what a client in
the test process needs (``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL``, the S3 credentials and
region, ``NO_PROXY``). Apply it per test with ``monkeypatch.setenv`` (see ``tests/stack_fixtures.py``,
fixture ``mlflow_env``), or pass ``stack.tracking_uri`` explicitly (``stack.client()`` does).
Artifacts go through the server (``mlflow-artifacts:/`` URIs), so the S3 variables are only needed by
code that talks to the bucket directly, e.g. boto3 assertions (``stack.s3_client()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import psycopg

from genai_mlflow import stack

DB_NAME_PREFIX = "genai_mlflow_it"


class MlflowStack(stack.LocalStack):
    @property
    def _proc(self) -> subprocess.Popen[bytes] | None:
        """``mlflow_process``, under the name ``benchmarks/bench_exporter_common.py`` reads."""
        return self.mlflow_process


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def drop_stale_databases(admin_url: str) -> list[str]:
    """Drop databases left behind by test processes of this host that were killed before cleaning up.

    Only names ``<prefix>_<this host>_<pid>_<random>`` whose pid is dead and that have no open
    connections are dropped, so concurrent sessions (also from other hosts) are never touched.
    """
    prefix = f"{DB_NAME_PREFIX}_{_host_tag()}_"
    dropped: list[str] = []
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            names = [row[0] for row in conn.execute("SELECT datname FROM pg_database")]
            for name in names:
                pid = name.removeprefix(prefix).split("_", 1)[0]
                if not name.startswith(prefix) or not pid.isdigit() or stack.pid_alive(int(pid)):
                    continue
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
                ).fetchone()
                if row is not None and row[0] == 0:
                    stack.drop_database(admin_url, name)
                    dropped.append(name)
    except psycopg.Error:
        pass  # housekeeping only; never fail a test session over it
    return dropped


@contextlib.contextmanager
def mlflow_stack(
    tmp_dir: Path,
    *,
    workers: int = 2,
    pg_admin_url: str | None = None,
    startup_timeout: float = 180.0,
    server_args: Sequence[str] = (),
    server_env: Mapping[str, str] | None = None,
) -> Iterator[MlflowStack]:
    """Start S3, a fresh PostgreSQL database and ``mlflow server``; tear all of it down on exit.

    ``server_args`` are appended to the ``mlflow server`` command (e.g. ``--app-name basic-auth``) and
    ``server_env`` is added to its environment (e.g. ``MLFLOW_AUTH_CONFIG_PATH``).
    """
    admin_url = pg_admin_url or stack.default_pg_url()
    drop_stale_databases(admin_url)
    with MlflowStack(
        tmp_dir,
        pg_url=admin_url,
        database=f"{DB_NAME_PREFIX}_{_host_tag()}_{os.getpid()}_{uuid.uuid4().hex[:8]}",
        workers=workers,
        startup_timeout=startup_timeout,
        server_args=server_args,
        server_env=server_env,
    ) as running:
        yield running
