"""A real MLflow tracking stack for integration tests: PostgreSQL + moto S3 + ``mlflow server``.

``mlflow_stack(tmp_dir)`` starts, in this order:

1. ``moto_server`` (from this interpreter's ``bin`` dir) on a free 127.0.0.1 port, and creates a bucket;
2. a fresh PostgreSQL database on the server at ``GENAI_MLFLOW_TEST_PG_URL`` (default
   ``postgresql://postgres@127.0.0.1:5432/postgres``; trust auth);
3. ``mlflow server`` (uvicorn, ``--workers 2``) with that database as backend store and
   ``s3://<bucket>/artifacts`` as proxied artifact destination (``--serve-artifacts``).

Everything runs in its own process group and is torn down on exit, whatever happens in the ``with`` body:
the server and moto process groups are terminated (SIGTERM, then SIGKILL after a short grace period), and
the database is dropped after its connections are terminated. As a last line of defence against the test
process being killed outright, the direct children get ``PR_SET_PDEATHSIG`` on Linux.

Client-side environment: nothing is written to ``os.environ``. ``MlflowStack.env`` holds what a client in
the test process needs (``MLFLOW_TRACKING_URI``, ``MLFLOW_S3_ENDPOINT_URL``, dummy AWS credentials and
region, ``NO_PROXY``). Apply it per test with ``monkeypatch.setenv`` (see ``tests/stack_fixtures.py``,
fixture ``mlflow_env``), or pass ``stack.tracking_uri`` explicitly (``stack.client()`` does).
Artifacts go through the server (``mlflow-artifacts:/`` URIs), so the S3 variables are only needed by
code that talks to the bucket directly, e.g. boto3 assertions (``stack.s3_client()``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    import mlflow

PG_ADMIN_URL_ENV = "GENAI_MLFLOW_TEST_PG_URL"
DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_NAME_PREFIX = "genai_mlflow_it"
AWS_DUMMY = "testing"
AWS_REGION = "us-east-1"

_HOST = "127.0.0.1"
_BIN_DIR = Path(sys.executable).parent
_STOP_GRACE_SECONDS = 5.0
_KILL_WAIT_SECONDS = 3.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((_HOST, port)) == 0


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# Runs as ``python -c _LAUNCHER <signal> <cmd...>``: sets PR_SET_PDEATHSIG (kept across execve) so the
# kernel signals the child if the test process dies without cleaning up, then execs the real command.
# Done in a launcher rather than in preexec_fn, which is unsafe in a multi-threaded parent.
_LAUNCHER = """
import ctypes, os, sys
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[1]), 0, 0, 0)
    except OSError:
        pass
os.execv(sys.argv[2], sys.argv[2:])
"""


def _spawn(
    cmd: list[str], log_path: Path, env: Mapping[str, str], death_signal: signal.Signals
) -> subprocess.Popen[bytes]:
    log: IO[bytes]
    with log_path.open("ab") as log:
        log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(int(death_signal)), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,  # own process group: killpg() reaches uvicorn and its workers
        )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def terminate_group(proc: subprocess.Popen[bytes], grace: float = _STOP_GRACE_SECONDS) -> None:
    """SIGTERM the process group led by ``proc``; SIGKILL it if it is not gone after ``grace`` seconds."""
    pgid = proc.pid  # start_new_session=True: the child is its group's leader
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_WAIT_SECONDS)):
        _signal_group(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, or it stays a zombie member of the group
            if proc.returncode is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_http_ok(
    url: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    timeout: float,
    what: str,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if _http_ok(url):
            return
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {proc.returncode} before {url} answered.\n"
                f"--- last lines of {log_path} ---\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} did not answer {url} within {timeout:.0f}s.\n"
                f"--- last lines of {log_path} ---\n{_tail(log_path)}"
            )
        time.sleep(0.2)


def _no_proxy(existing: str | None) -> str:
    hosts = [h for h in (existing or "").split(",") if h]
    for host in ("127.0.0.1", "localhost"):
        if host not in hosts:
            hosts.append(host)
    return ",".join(hosts)


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for moto at ``endpoint``, with the dummy credentials."""
    import boto3  # type: ignore[import-untyped]

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS_REGION,
        aws_access_key_id=AWS_DUMMY,
        aws_secret_access_key=AWS_DUMMY,
    )


def _with_database(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{dbname}"))


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_database(admin_url: str, dbname: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


def drop_database(admin_url: str, dbname: str) -> None:
    """Terminate every connection to ``dbname`` and drop it. Idempotent."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        # Keep new connections out while the old ones are terminated.
        conn.execute("UPDATE pg_database SET datallowconn = false WHERE datname = %s", (dbname,))
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


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
                if not name.startswith(prefix) or not pid.isdigit() or _pid_alive(int(pid)):
                    continue
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
                ).fetchone()
                if row is not None and row[0] == 0:
                    drop_database(admin_url, name)
                    dropped.append(name)
    except psycopg.Error:
        pass  # housekeeping only; never fail a test session over it
    return dropped


@dataclass
class MlflowStack:
    """A running MLflow server backed by PostgreSQL and moto S3. Build it with ``mlflow_stack()``."""

    tracking_uri: str
    """``http://127.0.0.1:<port>`` of the MLflow server."""
    s3_endpoint: str
    """``http://127.0.0.1:<port>`` of moto_server."""
    bucket: str
    db_url: str
    """``postgresql://postgres@127.0.0.1:5432/<dbname>`` (libpq form; psycopg.connect() takes it)."""
    env: dict[str, str]
    """Client-side environment for the test process; apply with ``monkeypatch.setenv``."""
    log_path: Path
    """The MLflow server's stdout/stderr, appended across restarts."""
    startup_timeout: float = 180.0
    _cmd: list[str] = field(default_factory=list, repr=False)
    _server_env: dict[str, str] = field(default_factory=dict, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.tracking_uri.rsplit(":", 1)[1])

    @property
    def backend_store_uri(self) -> str:
        """The SQLAlchemy URI the server uses (psycopg 3 driver; psycopg2 is not installed)."""
        return self.db_url.replace("postgresql://", "postgresql+psycopg://", 1)

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start_mlflow(self) -> None:
        """Start the server (same port, same database) and wait until ``/health`` answers 200."""
        if self.running:
            return
        if _port_accepts(self.port):
            raise RuntimeError(f"port {self.port} is taken; cannot (re)start MLflow on it")
        self._proc = _spawn(self._cmd, self.log_path, self._server_env, signal.SIGTERM)
        try:
            _wait_http_ok(
                f"{self.tracking_uri}/health",
                self._proc,
                self.log_path,
                self.startup_timeout,
                "mlflow server",
            )
        except BaseException:
            self.stop_mlflow()
            raise

    def stop_mlflow(self, *, grace: float = _STOP_GRACE_SECONDS) -> None:
        """Kill the MLflow server's whole process group (SIGTERM, SIGKILL after ``grace`` s).

        PostgreSQL and moto keep running; ``start_mlflow()`` brings the server back on the same port.
        Pass ``grace=0`` for an abrupt outage (SIGKILL straight away).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        terminate_group(proc, grace=grace)
        deadline = time.monotonic() + _KILL_WAIT_SECONDS
        while _port_accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    @contextlib.contextmanager
    def outage(self, *, grace: float = _STOP_GRACE_SECONDS) -> Iterator[None]:
        """Stop the MLflow server for the ``with`` body and start it again afterwards, even on error."""
        self.stop_mlflow(grace=grace)
        try:
            yield
        finally:
            self.start_mlflow()

    def client(self) -> mlflow.MlflowClient:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def s3_client(self) -> Any:
        """A boto3 S3 client for the moto bucket."""
        return s3_client(self.s3_endpoint)


def _start_moto(tmp_dir: Path, env: Mapping[str, str], timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log_path = tmp_dir / "moto-server.log"
    proc = _spawn(
        [str(_BIN_DIR / "moto_server"), "-H", _HOST, "-p", str(port)], log_path, env, signal.SIGKILL
    )
    endpoint = f"http://{_HOST}:{port}"
    try:
        _wait_http_ok(f"{endpoint}/moto-api/", proc, log_path, timeout, "moto_server")
    except BaseException:
        terminate_group(proc, grace=0)
        raise
    return proc, endpoint


@contextlib.contextmanager
def mlflow_stack(
    tmp_dir: Path,
    *,
    workers: int = 2,
    pg_admin_url: str | None = None,
    startup_timeout: float = 180.0,
) -> Iterator[MlflowStack]:
    """Start moto S3, a fresh PostgreSQL database and ``mlflow server``; tear all of it down on exit."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    admin_url = pg_admin_url or os.environ.get(PG_ADMIN_URL_ENV, DEFAULT_PG_ADMIN_URL)
    dbname = f"{DB_NAME_PREFIX}_{_host_tag()}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    bucket = f"genai-mlflow-it-{uuid.uuid4().hex[:8]}"

    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "MLFLOW_")) and k not in ("no_proxy", "NO_PROXY")
    }
    no_proxy = _no_proxy(os.environ.get("NO_PROXY") or os.environ.get("no_proxy"))
    aws_env = {
        "AWS_ACCESS_KEY_ID": AWS_DUMMY,
        "AWS_SECRET_ACCESS_KEY": AWS_DUMMY,
        "AWS_DEFAULT_REGION": AWS_REGION,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }

    with contextlib.ExitStack() as cleanup:
        moto_proc, s3_endpoint = _start_moto(tmp_dir, {**base_env, **aws_env}, timeout=60)
        cleanup.callback(terminate_group, moto_proc)

        s3_client(s3_endpoint).create_bucket(Bucket=bucket)

        drop_stale_databases(admin_url)
        create_database(admin_url, dbname)
        cleanup.callback(drop_database, admin_url, dbname)

        port = free_port()
        tracking_uri = f"http://{_HOST}:{port}"
        client_env = {
            **aws_env,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        }
        server_env = {
            **base_env,
            **aws_env,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "PYTHONUNBUFFERED": "1",
            # Nothing leaves the machine, and no huey job runner processes are needed by these tests.
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            # Cost calculation otherwise fetches a model price catalog from GitHub on the first
            # priced span per worker and provider: seconds of delay offline. Use the bundled catalog.
            "MLFLOW_MODEL_CATALOG_URI": "",
        }
        stack = MlflowStack(
            tracking_uri=tracking_uri,
            s3_endpoint=s3_endpoint,
            bucket=bucket,
            db_url=_with_database(admin_url, dbname),
            env=client_env,
            log_path=tmp_dir / "mlflow-server.log",
            startup_timeout=startup_timeout,
        )
        stack._server_env = server_env
        stack._cmd = [
            str(_BIN_DIR / "mlflow"),
            "server",
            "--host", _HOST,
            "--port", str(port),
            "--workers", str(workers),
            "--backend-store-uri", stack.backend_store_uri,
            "--artifacts-destination", stack.artifacts_destination,
            "--serve-artifacts",
        ]  # fmt: skip
        # Registered after the database callback, so it runs first: stop the server, then drop its DB.
        cleanup.callback(stack.stop_mlflow)
        stack.start_mlflow()
        yield stack
