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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ENV_PG_URL = "GENAI_MLFLOW_STACK_PG_URL"
ENV_STATE_DIR = "GENAI_MLFLOW_STACK_DIR"
DEFAULT_DATABASE = "genai_mlflow"
DEFAULT_BUCKET = "genai-mlflow"
STATE_FILE = "stack.json"
# Stop order of `down`: the collector drains into MLflow, MLflow needs S3.
_STOP_ORDER = ("collector", "mlflow", "s3")
_STOP_GRACE = {"collector": 30.0, "mlflow": 10.0, "s3": 5.0}


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
        env = {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
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


def _free_port() -> int:
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
        return _free_port()
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


def _spawn(name: str, cmd: list[str], env: Mapping[str, str], log_path: Path, port: int, url: str) -> Service:
    log: IO[bytes]
    with log_path.open("ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=log_path.parent,
            start_new_session=True,  # its own process group, and it outlives `stack up`
        )
    start_time = _proc_start_time(proc.pid) or 0
    return Service(name, proc.pid, start_time, port, url, str(log_path), cmd)


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_http(
    service: Service, path: str, timeout: float, *, accept: Callable[[int], bool] | None = None
) -> None:
    accept = accept or (lambda status: status == 200)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not is_running(service):
            raise StackError(
                f"{service.name} exited while starting; its log ({service.log}) ends:\n{_tail(service.log)}"
            )
        try:
            with urllib.request.urlopen(f"{service.url}{path}", timeout=2) as resp:
                if accept(resp.status):
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            if accept(exc.code):
                return
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise StackError(
        f"{service.name} did not answer {service.url}{path} in {timeout:.0f} s ({last}); see {service.log}"
    )


def stop_service(service: Service, grace: float) -> bool:
    """SIGTERM the service's process group, SIGKILL after ``grace`` s. False if it was not running."""
    if not is_running(service):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and is_running(service):
        time.sleep(0.1)
    if is_running(service):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and is_running(service):
            time.sleep(0.05)
    # Children that outlived the leader (uvicorn workers) share its process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.pid, signal.SIGKILL)
    return True


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


def _create_bucket(endpoint: str, access_key: str, secret_key: str, bucket: str) -> None:
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.exceptions import ClientError  # type: ignore[import-untyped]
    except ImportError as exc:
        raise StackError("the stack needs boto3: pip install 'genai-mlflow[stack]'") from exc
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
    )
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


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "GENAI_MLFLOW_"))}
    no_proxy = ",".join(
        p for p in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "", HOST, "localhost") if p
    )
    env.update(NO_PROXY=no_proxy, no_proxy=no_proxy, PYTHONUNBUFFERED="1")
    return env


def _start_s3(state_dir: Path, port: int, prefer: str) -> tuple[Service, str, str, str]:
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
        service = _spawn("s3", cmd, env, state_dir / "minio.log", port, url)
        _wait_http(service, "/minio/health/ready", 60)
        return service, "minio", keys["access_key"], keys["secret_key"]
    moto = _bin("moto_server")
    if moto is None:
        raise StackError(
            "no S3 API: put `minio` on PATH, or pip install 'genai-mlflow[stack]' for moto_server"
        )
    cmd = [moto, "-H", HOST, "-p", str(port)]
    service = _spawn("s3", cmd, env, state_dir / "moto.log", port, url)
    _wait_http(service, "/moto-api/", 60)
    return service, "moto", "genai-mlflow", "genai-mlflow"


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
# commands


def up(
    *,
    state_dir: Path,
    pg_url: str,
    database: str = DEFAULT_DATABASE,
    bucket: str = DEFAULT_BUCKET,
    mlflow_port: int = 5000,
    s3_port: int = 9000,
    collector_port: int = 4318,
    workers: int = 2,
    s3: str = "auto",
    collector: str = "auto",
    collector_token: str | None = None,
    out: IO[str] = sys.stdout,
) -> StackState:
    """Start the stack and return its state; raises StackError (after stopping what it started)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / STATE_FILE
    if state_path.exists():
        previous = StackState.load(state_path)
        alive = [s.name for s in previous.services.values() if is_running(s)]
        if alive:
            raise StackError(
                f"a stack is already running from {state_dir} ({', '.join(alive)}); "
                "`genai-mlflow stack down` first, or pass another --state-dir"
            )
        state_path.unlink()

    mlflow_port = _pick_port(mlflow_port, "MLflow")
    s3_port = _pick_port(s3_port, "S3")
    want_collector = collector == "on" or (collector == "auto" and _collector_available())
    if collector == "on" and not _collector_available():
        raise StackError("--collector on, but this genai-mlflow has no `collector` command yet")
    if want_collector:
        collector_port = _pick_port(collector_port, "the collector")

    created = ensure_database(pg_url, database)
    print(
        f"PostgreSQL  {_redact(_libpq_with_db(pg_url, database))} ({'created' if created else 'exists'})",
        file=out,
    )

    started: list[Service] = []
    try:
        s3_service, s3_kind, access_key, secret_key = _start_s3(state_dir, s3_port, s3)
        started.append(s3_service)
        _create_bucket(s3_service.url, access_key, secret_key, bucket)
        print(f"S3 ({s3_kind}){' ' * (7 - len(s3_kind))}{s3_service.url}  bucket {bucket}", file=out)

        state = StackState(
            state_dir=str(state_dir),
            database_url=_redact(_libpq_with_db(pg_url, database)),
            database=database,
            bucket=bucket,
            s3_kind=s3_kind,
            s3_endpoint=s3_service.url,
            s3_access_key=access_key,
            s3_secret_key=secret_key,
            mlflow_url=f"http://{HOST}:{mlflow_port}",
            collector_url=None,
            services={"s3": s3_service},
            started_at=time.time(),
        )
        state.save(state_path)

        backend_uri = _libpq_with_db(pg_url, database).replace("postgresql://", "postgresql+psycopg://", 1)
        mlflow_bin = _bin("mlflow") or "mlflow"
        env = _mlflow_env(state)
        # The chart's `migrate` step: bring the schema to this MLflow's head before serving.
        migrate = subprocess.run(
            [mlflow_bin, "db", "upgrade", backend_uri],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if migrate.returncode != 0:
            raise StackError(f"mlflow db upgrade failed:\n{migrate.stderr[-3000:]}")
        cmd = [
            mlflow_bin, "server",
            "--host", HOST,
            "--port", str(mlflow_port),
            "--workers", str(workers),
            "--backend-store-uri", backend_uri,
            "--serve-artifacts",
            "--artifacts-destination", f"s3://{bucket}/artifacts",
        ]  # fmt: skip
        mlflow_service = _spawn("mlflow", cmd, env, state_dir / "mlflow.log", mlflow_port, state.mlflow_url)
        started.append(mlflow_service)
        state.services["mlflow"] = mlflow_service
        state.save(state_path)
        _wait_http(mlflow_service, "/health", 180)
        print(f"MLflow      {state.mlflow_url}", file=out)

        if want_collector:
            collector_env = _base_env()
            collector_env.update(
                MLFLOW_TRACKING_URI=state.mlflow_url,
                GENAI_MLFLOW_SPOOL_DIR=str(state_dir / "collector-spool"),
            )
            if collector_token:
                collector_env["GENAI_MLFLOW_COLLECTOR_TOKEN"] = collector_token
            url = f"http://{HOST}:{collector_port}"
            cmd = [sys.executable, "-m", "genai_mlflow.cli", "collector", "--port", str(collector_port)]
            collector_service = _spawn(
                "collector", cmd, collector_env, state_dir / "collector.log", collector_port, url
            )
            started.append(collector_service)
            state.services["collector"] = collector_service
            state.collector_url = url
            state.save(state_path)
            _wait_http(collector_service, "/healthz", 60)
            print(f"collector   {url}/v1/traces", file=out)
        else:
            print("collector   not started (this genai-mlflow has no `collector` command)", file=out)
    except BaseException:
        for service in reversed(started):
            stop_service(service, _STOP_GRACE.get(service.name, 5.0))
        with contextlib.suppress(FileNotFoundError):
            state_path.unlink()
        raise

    print("\nUse it:", file=out)
    for key, value in state.client_env().items():
        print(f"  export {key}={value}", file=out)
    print(f"\nLogs and state in {state_dir}; stop with `genai-mlflow stack down`.", file=out)
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
        default=os.environ.get(ENV_PG_URL, DEFAULT_PG_URL),
        help=f"an existing PostgreSQL server, as an admin URL (default: {ENV_PG_URL}, else {DEFAULT_PG_URL})",
    )
    stack.add_argument("--database", default=DEFAULT_DATABASE, help="MLflow's database, created when missing")
    stack.add_argument("--bucket", default=DEFAULT_BUCKET, help="artifact bucket, created when missing")
    stack.add_argument("--mlflow-port", type=int, default=5000, help="0 picks a free port")
    stack.add_argument("--s3-port", type=int, default=9000, help="0 picks a free port")
    stack.add_argument("--collector-port", type=int, default=4318, help="0 picks a free port")
    stack.add_argument("--workers", type=int, default=2, help="MLflow server workers")
    stack.add_argument(
        "--s3", choices=("auto", "minio", "moto"), default="auto", help="auto: MinIO if on PATH"
    )
    stack.add_argument("--collector", choices=("auto", "on", "off"), default="auto")
    stack.add_argument("--collector-token", help="bearer token the collector requires (default: none)")


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    state_dir: Path = args.state_dir or default_state_dir()
    try:
        if args.action == "up":
            up(
                state_dir=state_dir,
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
                out=out,
            )
            return 0
        if args.action == "down":
            down(state_dir=state_dir, out=out)
            return 0
        return 0 if status(state_dir=state_dir, out=out) else 1
    except StackError as exc:
        print(f"genai-mlflow stack: {exc}", file=sys.stderr)
        return 1
