"""``genai-mlflow stack up|down|status``: on one machine, what the Helm chart runs in a cluster.

- **PostgreSQL**: an existing server (default ``postgresql://postgres@127.0.0.1:5432/postgres``);
  the database ``genai_mlflow`` is created when missing and kept by ``down``.
- **S3**: real MinIO when a ``minio`` binary is on PATH (its data kept under the state directory),
  else ``moto_server`` (in memory). The bucket ``genai-mlflow`` is created.
- **MLflow**: ``mlflow db upgrade`` first (the chart's migrate step), then ``mlflow server`` on
  PostgreSQL with ``--serve-artifacts`` to the bucket.
- **The collector**: ``genai-mlflow collector --port ...``, writing to that MLflow.

The processes outlive ``up``: each runs in its own session, logs to the state directory, and is
recorded (pid, start time, port) in ``stack.json`` there, so that ``down`` stops exactly those
processes (the collector first, so it can drain to MLflow) even from another shell.

The same code is a library, ``LocalStack``: ``with LocalStack(state_dir, database=...) as stack:``
starts these pieces for the ``with`` block (the tests and the benchmarks run on it). There its
processes get ``PR_SET_PDEATHSIG``, so that they die with the thread that started them, MLflow can be
stopped and started again on its port (an outage), and at exit everything is stopped and a database
the stack created is dropped. ``start_collector`` starts a collector on its own.

Needs the ``stack`` extra (``pip install 'genai-mlflow[stack]'``): psycopg, boto3 and moto.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlflow

HOST = "127.0.0.1"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ENV_PG_URL = "GENAI_MLFLOW_STACK_PG_URL"
ENV_STATE_DIR = "GENAI_MLFLOW_STACK_DIR"
DEFAULT_DATABASE = "genai_mlflow"
DEFAULT_BUCKET = "genai-mlflow"
# MLflow's own default. With two, the server leaves two cores half idle while it waits on
# PostgreSQL, and lands a run plus a trace per call at 14-20 calls/s here, against 21-25 with four.
DEFAULT_WORKERS = 4
STATE_FILE = "stack.json"
# Stop order of `down`: the collector drains into MLflow, MLflow needs S3.
_STOP_ORDER = ("collector", "mlflow", "s3")
_STOP_GRACE = {"collector": 30.0, "mlflow": 5.0, "s3": 5.0}
_KILL_WAIT_S = 3.0  # after SIGKILL, for the process (group) to be gone


class StackError(RuntimeError):
    """Something the user can fix; the message says what."""


@dataclass
class Service:
    name: str
    pid: int
    start_time: int
    """Process start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), so a recycled pid
    is never mistaken for ours."""
    port: int
    url: str
    log: str
    command: list[str]


@dataclass
class StackState:
    state_dir: str
    database_url: str
    """libpq form, without password."""
    database: str
    bucket: str
    s3_kind: str
    """``minio`` or ``moto``."""
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    mlflow_url: str
    collector_url: str | None
    services: dict[str, Service] = field(default_factory=dict)
    started_at: float = 0.0

    def client_env(self) -> dict[str, str]:
        """What an app (or a test) needs to use the stack."""
        no_proxy = _no_proxy()
        env = {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
        if self.collector_url:
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"{self.collector_url}/v1/traces"
        return env

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the S3 keys
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> StackState:
        data = json.loads(path.read_text())
        services = {name: Service(**svc) for name, svc in data.pop("services").items()}
        return cls(**data, services=services)


# ---------------------------------------------------------------------------------------------
# processes


def default_state_dir() -> Path:
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "genai-mlflow" / "stack"


def default_pg_url() -> str:
    return os.environ.get(ENV_PG_URL) or DEFAULT_PG_URL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _pick_port(requested: int, what: str) -> int:
    if requested == 0:
        return free_port()
    if _port_in_use(requested):
        raise StackError(f"port {requested} for {what} is taken; choose another (0 picks a free one)")
    return requested


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0  # no /proc (not Linux): the pid alone has to do
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has finished
    return int(fields[19])


def is_running(service: Service) -> bool:
    current = _proc_start_time(service.pid)
    return current is not None and service.start_time in (current, 0)


def _bin(name: str) -> str | None:
    """A console script next to this interpreter first (the venv's), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


# Runs as ``python -c _LAUNCHER <cmd...>``: sets PR_SET_PDEATHSIG (kept across execve), so that the
# kernel sends SIGTERM to the service when the thread that started it dies without stopping it (a
# killed test run), then execs the service. A launcher, as preexec_fn is unsafe in a threaded parent.
_LAUNCHER = """
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except OSError:
        pass
os.execvp(sys.argv[1], sys.argv[1:])
"""


@dataclass
class Child:
    """A service this process started: its record, and the ``Popen`` that reaps it."""

    service: Service
    popen: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float) -> int | None:
        """Stop its process group (see ``stop_process``); its exit status."""
        stop_process(self.popen, grace)
        return self.popen.returncode


def _spawn(
    name: str, cmd: list[str], env: Mapping[str, str], log_path: Path, port: int, url: str, *, detached: bool
) -> Child:
    """Start ``cmd`` in a process group of its own (so that stopping it reaches its children), logging
    to ``log_path``; ``detached``: it outlives this process, else it dies with the calling thread."""
    log: IO[bytes]
    with log_path.open("ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd if detached else [sys.executable, "-c", _LAUNCHER, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=log_path.parent,
            start_new_session=True,
        )
    start_time = _proc_start_time(proc.pid) or 0
    return Child(Service(name, proc.pid, start_time, port, url, str(log_path), cmd), proc)


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_started(child: Child, path: str, timeout: float) -> None:
    """Wait until ``path`` answers 200; if it does not in time, or the child exits, stop it and raise."""
    try:
        _wait_http(child, path, timeout)
    except BaseException:
        child.stop(0)
        raise


def _wait_http(child: Child, path: str, timeout: float) -> None:
    service = child.service
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.running:
            raise StackError(
                f"{service.name} exited while starting; its log ({service.log}) ends:\n{_tail(service.log)}"
            )
        try:
            with urllib.request.urlopen(f"{service.url}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise StackError(
        f"{service.name} did not answer {service.url}{path} in {timeout:.0f} s ({last}); see {service.log}"
    )


def _wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reachable(kill: Callable[[int, int], None], target: int) -> bool:
    """Whether signal 0 reaches ``target``: a process with ``os.kill``, a process group with ``os.killpg``."""
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's
    return True


def pid_alive(pid: int) -> bool:
    return _reachable(os.kill, pid)


def _group_alive(pgid: int) -> bool:
    return _reachable(os.killpg, pgid)


def _stop_group(pgid: int, alive: Callable[[], bool], grace: float) -> None:
    """SIGTERM the process group led by ``pgid``; SIGKILL it if its leader is not gone after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_WAIT_S)):
        _killpg(pgid, sig)
        if _wait_until(lambda: not alive(), wait):
            break
    # Children that outlived the leader (uvicorn workers) share its process group.
    _killpg(pgid, signal.SIGKILL)
    _wait_until(lambda: not _group_alive(pgid), _KILL_WAIT_S)


def stop_service(service: Service, grace: float) -> bool:
    """Stop a recorded service's process group (see ``_stop_group``). False if it was not running."""
    if not is_running(service):
        return False
    _stop_group(service.pid, lambda: is_running(service), grace)
    return True


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Stop the process group that ``proc`` leads (started with ``start_new_session=True``), and reap it."""
    _stop_group(proc.pid, lambda: proc.poll() is None, grace)


# ---------------------------------------------------------------------------------------------
# the pieces


def _libpq_with_db(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{dbname}"))


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def ensure_database(admin_url: str, dbname: str) -> bool:
    """Create ``dbname`` on the server of ``admin_url`` unless it exists. True if created."""
    try:
        import psycopg
        from psycopg import errors, sql
    except ImportError as exc:
        raise StackError("the stack needs psycopg: pip install 'genai-mlflow[stack]'") from exc
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone():
                return False
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            except errors.DuplicateDatabase:
                return False
            return True
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StackError(
            f"cannot reach PostgreSQL at {_redact(admin_url)} ({first}); start it, "
            f"or point --pg-url (or {ENV_PG_URL}) at a server"
        ) from exc


def drop_database(admin_url: str, dbname: str) -> None:
    """Terminate every connection to ``dbname`` and drop it; nothing if there is no such database."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        # Keep new connections out while the old ones are terminated.
        conn.execute("UPDATE pg_database SET datallowconn = false WHERE datname = %s", (dbname,))
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


def _s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    try:
        import boto3  # type: ignore[import-untyped]
    except ImportError as exc:
        raise StackError("the stack needs boto3: pip install 'genai-mlflow[stack]'") from exc
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
    )


def _create_bucket(endpoint: str, access_key: str, secret_key: str, bucket: str) -> None:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    client = _s3_client(endpoint, access_key, secret_key)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                return
            if time.monotonic() > deadline:
                raise StackError(f"cannot create bucket {bucket} at {endpoint}: {exc}") from exc
            time.sleep(0.5)


def _no_proxy() -> str:
    """``NO_PROXY`` with the stack's host added: a proxy set for the internet must not take its calls."""
    hosts = [h for h in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",") if h]
    return ",".join(hosts + [h for h in (HOST, "localhost") if h not in hosts])


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "GENAI_MLFLOW_"))}
    no_proxy = _no_proxy()
    env.update(NO_PROXY=no_proxy, no_proxy=no_proxy, PYTHONUNBUFFERED="1")
    return env


def _start_s3(state_dir: Path, port: int, prefer: str, *, detached: bool) -> tuple[Child, str, str, str]:
    minio = shutil.which("minio") if prefer in ("auto", "minio") else None
    if prefer == "minio" and minio is None:
        raise StackError("--s3 minio: no `minio` binary on PATH")
    url = f"http://{HOST}:{port}"
    env = _base_env()
    if minio:
        keys_path = state_dir / "minio-credentials.json"
        if keys_path.exists():  # the data directory keeps its root credentials
            keys = json.loads(keys_path.read_text())
        else:
            keys = {"access_key": "genai" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(24)}
            fd = os.open(keys_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(keys, handle)
        data_dir = state_dir / "minio-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        env.update(
            MINIO_ROOT_USER=keys["access_key"], MINIO_ROOT_PASSWORD=keys["secret_key"], MINIO_BROWSER="off"
        )
        cmd = [minio, "server", str(data_dir), "--address", f"{HOST}:{port}", "--quiet"]
        child = _spawn("s3", cmd, env, state_dir / "minio.log", port, url, detached=detached)
        _wait_started(child, "/minio/health/ready", 60)
        return child, "minio", keys["access_key"], keys["secret_key"]
    moto = _bin("moto_server")
    if moto is None:
        raise StackError(
            "no S3 API: put `minio` on PATH, or pip install 'genai-mlflow[stack]' for moto_server"
        )
    cmd = [moto, "-H", HOST, "-p", str(port)]
    child = _spawn("s3", cmd, env, state_dir / "moto.log", port, url, detached=detached)
    _wait_started(child, "/moto-api/", 60)
    return child, "moto", "genai-mlflow", "genai-mlflow"


def _mlflow_env(state: StackState) -> dict[str, str]:
    env = _base_env()
    env.update(
        AWS_ACCESS_KEY_ID=state.s3_access_key,
        AWS_SECRET_ACCESS_KEY=state.s3_secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_S3_ENDPOINT_URL=state.s3_endpoint,
        # As in the chart: the bundled price catalogue (no 7 s fetch offline), no telemetry, no jobs.
        MLFLOW_MODEL_CATALOG_URI="",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    return env


def _collector_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("genai_mlflow.collector") is not None


# ---------------------------------------------------------------------------------------------
# the stack, as a library


def start_collector(
    tracking_uri: str,
    *,
    spool_dir: Path,
    log_path: Path,
    port: int = 0,
    token: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    detached: bool = False,
    timeout: float = 60.0,
) -> Child:
    """``genai-mlflow collector`` writing to ``tracking_uri``, once ``/healthz`` answers.

    ``port`` 0 picks a free one; ``args`` are more ``collector`` options, ``env`` more environment;
    ``detached`` as for ``_spawn``.
    """
    port = _pick_port(port, "the collector")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = _base_env()
    child_env.update(MLFLOW_TRACKING_URI=tracking_uri, GENAI_MLFLOW_SPOOL_DIR=str(spool_dir))
    if token:
        child_env["GENAI_MLFLOW_COLLECTOR_TOKEN"] = token  # not on the command line, where ps shows it
    child_env.update(env or {})
    cmd = [sys.executable, "-m", "genai_mlflow.cli", "collector", "--port", str(port), *args]
    url = f"http://{HOST}:{port}"
    child = _spawn("collector", cmd, child_env, log_path, port, url, detached=detached)
    _wait_started(child, "/healthz", timeout)
    return child


class LocalStack:
    """The stack's processes, started and stopped by this process; ``start()``, then ``stop()``, or
    ``with LocalStack(...) as stack:``, which also drops the database at exit if it created it.

    ``detached`` (``stack up``): the processes outlive this one, and ``down`` stops them from their
    records. Otherwise they die with the thread that started them. Ports 0 pick free ones.
    ``server_args`` and ``server_env`` go to ``mlflow server`` (e.g. ``--app-name basic-auth``).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        pg_url: str | None = None,
        database: str = DEFAULT_DATABASE,
        bucket: str = DEFAULT_BUCKET,
        mlflow_port: int = 0,
        s3_port: int = 0,
        collector_port: int = 0,
        workers: int = DEFAULT_WORKERS,
        s3: str = "auto",
        collector: str = "off",
        collector_token: str | None = None,
        server_args: Sequence[str] = (),
        server_env: Mapping[str, str] | None = None,
        detached: bool = False,
        startup_timeout: float = 180.0,
    ) -> None:
        self.state_dir = state_dir
        self.pg_url = pg_url or default_pg_url()
        self.database = database
        self.bucket = bucket
        self._ports = {"mlflow": mlflow_port, "s3": s3_port, "collector": collector_port}
        self._workers = workers
        self._s3 = s3
        self._collector = collector
        self._collector_token = collector_token
        self._server_args = list(server_args)
        self._server_env = dict(server_env or {})
        self._detached = detached
        self._startup_timeout = startup_timeout
        self._children: dict[str, Child] = {}
        self._state: StackState | None = None
        self._created_database = False

    # --- what clients need -----------------------------------------------------------------------

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def state(self) -> StackState:
        if self._state is None:
            raise StackError("the stack has not been started")
        return self._state

    @property
    def tracking_uri(self) -> str:
        return self.state.mlflow_url

    @property
    def s3_endpoint(self) -> str:
        return self.state.s3_endpoint

    @property
    def collector_url(self) -> str | None:
        return self.state.collector_url

    @property
    def db_url(self) -> str:
        """MLflow's database in libpq form, which ``psycopg.connect()`` takes."""
        return _libpq_with_db(self.pg_url, self.database)

    @property
    def env(self) -> dict[str, str]:
        """The environment of a client of the stack (``StackState.client_env``)."""
        return self.state.client_env()

    def client(self) -> mlflow.MlflowClient:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def s3_client(self) -> Any:
        """A boto3 S3 client for the stack's bucket."""
        state = self.state
        return _s3_client(state.s3_endpoint, state.s3_access_key, state.s3_secret_key)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, out: IO[str] | None = None) -> StackState:
        """Start everything, saying what to ``out``; raises StackError after stopping what it started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.state_dir / STATE_FILE
        if state_path.exists():
            previous = StackState.load(state_path)
            alive = [s.name for s in previous.services.values() if is_running(s)]
            if alive:
                raise StackError(
                    f"a stack is already running from {self.state_dir} ({', '.join(alive)}); "
                    "`genai-mlflow stack down` first, or pass another --state-dir"
                )
            state_path.unlink()

        mlflow_port = _pick_port(self._ports["mlflow"], "MLflow")
        s3_port = _pick_port(self._ports["s3"], "S3")
        want_collector = self._collector == "on" or (self._collector == "auto" and _collector_available())
        if self._collector == "on" and not _collector_available():
            raise StackError("--collector on, but this genai-mlflow has no `collector` command yet")
        collector_port = _pick_port(self._ports["collector"], "the collector") if want_collector else 0

        self._created_database = ensure_database(self.pg_url, self.database)
        _say(out, f"PostgreSQL  {_redact(self.db_url)} ({'created' if self._created_database else 'exists'})")
        try:
            s3_child, s3_kind, access_key, secret_key = _start_s3(
                self.state_dir, s3_port, self._s3, detached=self._detached
            )
            self._children["s3"] = s3_child
            _create_bucket(s3_child.url, access_key, secret_key, self.bucket)
            _say(out, f"S3 ({s3_kind}){' ' * (7 - len(s3_kind))}{s3_child.url}  bucket {self.bucket}")
            self._state = StackState(
                state_dir=str(self.state_dir),
                database_url=_redact(self.db_url),
                database=self.database,
                bucket=self.bucket,
                s3_kind=s3_kind,
                s3_endpoint=s3_child.url,
                s3_access_key=access_key,
                s3_secret_key=secret_key,
                mlflow_url=f"http://{HOST}:{mlflow_port}",
                collector_url=None,
                started_at=time.time(),
            )
            self._save()
            self._migrate()
            self.start_mlflow()
            _say(out, f"MLflow      {self.tracking_uri}")
            if want_collector:
                child = start_collector(
                    self.tracking_uri,
                    spool_dir=self.state_dir / "collector-spool",
                    log_path=self.state_dir / "collector.log",
                    port=collector_port,
                    token=self._collector_token,
                    detached=self._detached,
                )
                self._children["collector"] = child
                self.state.collector_url = child.url
                self._save()
                _say(out, f"collector   {child.url}/v1/traces")
            elif self._collector == "off":
                _say(out, "collector   off")
            else:
                _say(out, "collector   not started (this genai-mlflow has no `collector` command)")
        except BaseException:
            self.stop()
            raise
        return self.state

    def stop(self) -> None:
        """Stop every process this stack started (the collector first, so it drains) and forget them."""
        for name in _STOP_ORDER:
            child = self._children.pop(name, None)
            if child is not None:
                child.stop(_STOP_GRACE[name])
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STATE_FILE).unlink()

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self._drop_created_database()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        finally:
            self._drop_created_database()

    def _drop_created_database(self) -> None:
        if self._created_database:
            drop_database(self.pg_url, self.database)
            self._created_database = False

    def _save(self) -> None:
        state = self.state
        state.services = {name: child.service for name, child in self._children.items()}
        state.save(self.state_dir / STATE_FILE)

    def _migrate(self) -> None:
        """The chart's ``migrate`` step: the schema at this MLflow's head before the server starts."""
        migrate = subprocess.run(
            [_bin("mlflow") or "mlflow", "db", "upgrade", self._backend_store_uri()],
            env=_mlflow_env(self.state),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if migrate.returncode != 0:
            raise StackError(f"mlflow db upgrade failed:\n{migrate.stderr[-3000:]}")

    def _backend_store_uri(self) -> str:
        return self.db_url.replace("postgresql://", "postgresql+psycopg://", 1)

    # --- MLflow outages --------------------------------------------------------------------------

    @property
    def mlflow_process(self) -> subprocess.Popen[bytes] | None:
        """The MLflow server's process (the leader of its process group), while it runs."""
        child = self._children.get("mlflow")
        return child.popen if child is not None else None

    @property
    def running(self) -> bool:
        """Whether the MLflow server runs (``stop_mlflow`` stops it alone)."""
        child = self._children.get("mlflow")
        return child is not None and child.running

    def start_mlflow(self) -> None:
        """Start the MLflow server (on its port, on its database) and wait until ``/health`` answers."""
        if self.running:
            return
        port = int(self.tracking_uri.rsplit(":", 1)[1])
        if _port_in_use(port):
            raise StackError(f"port {port} is taken; cannot (re)start MLflow on it")
        cmd = [
            _bin("mlflow") or "mlflow", "server",
            "--host", HOST,
            "--port", str(port),
            "--workers", str(self._workers),
            "--backend-store-uri", self._backend_store_uri(),
            "--serve-artifacts",
            "--artifacts-destination", f"s3://{self.bucket}/artifacts",
            *self._server_args,
        ]  # fmt: skip
        env = {**_mlflow_env(self.state), **self._server_env}
        log_path = self.state_dir / "mlflow.log"
        child = _spawn("mlflow", cmd, env, log_path, port, self.tracking_uri, detached=self._detached)
        self._children["mlflow"] = child
        self._save()
        _wait_started(child, "/health", self._startup_timeout)

    def stop_mlflow(self, *, grace: float = _STOP_GRACE["mlflow"]) -> None:
        """Stop the MLflow server alone (SIGKILL after ``grace`` s; 0 for an abrupt outage) until
        ``start_mlflow()``; S3, the collector and the database keep running."""
        child = self._children.pop("mlflow", None)
        if child is None:
            return
        child.stop(grace)
        _wait_until(lambda: not _port_in_use(child.service.port), _KILL_WAIT_S)

    @contextlib.contextmanager
    def outage(self, *, grace: float = _STOP_GRACE["mlflow"]) -> Iterator[None]:
        """MLflow stopped for the ``with`` body, and started again afterwards, even on error."""
        self.stop_mlflow(grace=grace)
        try:
            yield
        finally:
            self.start_mlflow()


def _say(out: IO[str] | None, text: str) -> None:
    if out is not None:
        print(text, file=out)


# ---------------------------------------------------------------------------------------------
# commands


def up(local: LocalStack, out: IO[str] = sys.stdout) -> StackState:
    """Start a detached stack, and print how to use it."""
    state = local.start(out)
    print("\nUse it:", file=out)
    for key, value in state.client_env().items():
        print(f"  export {key}={value}", file=out)
    print(f"\nLogs and state in {local.state_dir}; stop with `genai-mlflow stack down`.", file=out)
    return state


def down(*, state_dir: Path, out: IO[str] = sys.stdout) -> bool:
    """Stop what ``up`` started. False when there was nothing to stop."""
    state_path = state_dir / STATE_FILE
    if not state_path.exists():
        print(f"no stack recorded in {state_dir}", file=out)
        return False
    state = StackState.load(state_path)
    for name in _STOP_ORDER:
        service = state.services.get(name)
        if service is None:
            continue
        stopped = stop_service(service, _STOP_GRACE[name])
        print(f"{name:<11} {'stopped' if stopped else 'was not running'} (pid {service.pid})", file=out)
    state_path.unlink()
    print(f"database {state.database} kept; logs in {state_dir}", file=out)
    return True


def status(*, state_dir: Path, out: IO[str] = sys.stdout) -> bool:
    """Print what runs. True when every recorded service is running."""
    state_path = state_dir / STATE_FILE
    if not state_path.exists():
        print(f"no stack recorded in {state_dir}", file=out)
        return False
    state = StackState.load(state_path)
    ok = True
    for name in reversed(_STOP_ORDER):
        service = state.services.get(name)
        if service is None:
            continue
        running = is_running(service)
        ok = ok and running
        print(
            f"{name:<11} {'running' if running else 'DOWN':<8} {service.url}  (pid {service.pid})", file=out
        )
    return ok


# ---------------------------------------------------------------------------------------------
# CLI


def add_parser(commands: Any) -> None:
    """Register ``stack up|down|status`` on the ``genai-mlflow`` subcommands."""
    stack = commands.add_parser("stack", help="run MLflow, PostgreSQL, S3 and the collector on this machine")
    stack.add_argument("action", choices=("up", "down", "status"))
    stack.add_argument(
        "--state-dir", type=Path, help=f"pids, ports and logs (default: {default_state_dir()})"
    )
    stack.add_argument(
        "--pg-url",
        default=default_pg_url(),
        help=f"an existing PostgreSQL server, as an admin URL (default: {ENV_PG_URL}, else {DEFAULT_PG_URL})",
    )
    stack.add_argument("--database", default=DEFAULT_DATABASE, help="MLflow's database, created when missing")
    stack.add_argument("--bucket", default=DEFAULT_BUCKET, help="artifact bucket, created when missing")
    stack.add_argument("--mlflow-port", type=int, default=5000, help="0 picks a free port")
    stack.add_argument("--s3-port", type=int, default=9000, help="0 picks a free port")
    stack.add_argument("--collector-port", type=int, default=4318, help="0 picks a free port")
    stack.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help=f"MLflow server workers ({DEFAULT_WORKERS})"
    )
    stack.add_argument(
        "--s3", choices=("auto", "minio", "moto"), default="auto", help="auto: MinIO if on PATH"
    )
    stack.add_argument("--collector", choices=("auto", "on", "off"), default="auto")
    stack.add_argument("--collector-token", help="bearer token the collector requires (default: none)")


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    state_dir: Path = args.state_dir or default_state_dir()
    try:
        if args.action == "up":
            local = LocalStack(
                state_dir,
                pg_url=args.pg_url,
                database=args.database,
                bucket=args.bucket,
                mlflow_port=args.mlflow_port,
                s3_port=args.s3_port,
                collector_port=args.collector_port,
                workers=args.workers,
                s3=args.s3,
                collector=args.collector,
                collector_token=args.collector_token,
                detached=True,
            )
            up(local, out)
            return 0
        if args.action == "down":
            down(state_dir=state_dir, out=out)
            return 0
        return 0 if status(state_dir=state_dir, out=out) else 1
    except StackError as exc:
        print(f"genai-mlflow stack: {exc}", file=sys.stderr)
        return 1
