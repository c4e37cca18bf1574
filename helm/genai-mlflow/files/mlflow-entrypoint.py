"""Entry point of the chart's MLflow pods (mounted from a ConfigMap; runs in the MLflow image).

``migrate`` (the init container): wait until PostgreSQL accepts connections, create the auth
database when it is missing, then, holding a PostgreSQL advisory lock so that replicas starting
together take turns, run ``mlflow db upgrade`` (and the auth store's own migrations).

``serve`` (the main container): build the database URIs from their parts (the password URL-quoted,
so any password works), write the basic-auth config to /tmp when auth is on, and exec
``mlflow server``.

Settings come from the environment:
  DB_HOST, DB_PORT, DB_NAME, DB_USER, DB_PASSWORD, DB_SSLMODE   the tracking database
  DB_WAIT_TIMEOUT                                                seconds to wait for it (600)
  MLFLOW_PORT, MLFLOW_WORKERS                                    the server
  MLFLOW_ARTIFACTS_DESTINATION                                   s3://bucket/prefix
  MLFLOW_ALLOWED_HOSTS, MLFLOW_CORS_ALLOWED_ORIGINS              comma-separated, optional
  MLFLOW_EXTRA_ARGS                                              a JSON list of extra arguments
  AUTH_ENABLED ("true"), AUTH_DB_NAME, AUTH_CREATE_DB ("true"), AUTH_DEFAULT_PERMISSION,
  MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD         basic auth (read by MLflow too)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

# Any constant shared by every replica of the release; pg_advisory_lock takes a bigint.
MIGRATION_LOCK_KEY = 0x6D6C666C6F77  # "mlflow"
AUTH_CONFIG_PATH = "/tmp/mlflow-auth/basic_auth.ini"


def log(message: str) -> None:
    print(f"[genai-mlflow] {message}", file=sys.stderr, flush=True)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def sqlalchemy_uri(env: Mapping[str, str], dbname: str) -> str:
    """``postgresql+psycopg://user:password@host:port/db?sslmode=...`` with every part quoted."""
    user = urllib.parse.quote(env["DB_USER"], safe="")
    password = urllib.parse.quote(env.get("DB_PASSWORD", ""), safe="")
    credentials = f"{user}:{password}" if password else user
    host = env["DB_HOST"]
    port = env.get("DB_PORT", "5432")
    query = urllib.parse.urlencode({"sslmode": env.get("DB_SSLMODE", "prefer")})
    return f"postgresql+psycopg://{credentials}@{host}:{port}/{urllib.parse.quote(dbname, safe='')}?{query}"


def _connect(env: Mapping[str, str], dbname: str, *, autocommit: bool = True, timeout: int = 5) -> Any:
    import psycopg

    return psycopg.connect(
        host=env["DB_HOST"],
        port=int(env.get("DB_PORT", "5432")),
        dbname=dbname,
        user=env["DB_USER"],
        password=env.get("DB_PASSWORD") or None,
        sslmode=env.get("DB_SSLMODE", "prefer"),
        connect_timeout=timeout,
        autocommit=autocommit,
    )


def wait_for_database(env: Mapping[str, str]) -> None:
    import psycopg

    deadline = time.monotonic() + float(env.get("DB_WAIT_TIMEOUT", "600"))
    where = f"{env['DB_HOST']}:{env.get('DB_PORT', '5432')}/{env['DB_NAME']}"
    attempt = 0
    while True:
        attempt += 1
        try:
            with _connect(env, env["DB_NAME"]) as conn:
                conn.execute("SELECT 1")
            log(f"database {where} is up")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise SystemExit(f"database {where} did not accept connections in time: {exc}") from exc
            if attempt == 1 or attempt % 10 == 0:
                log(f"waiting for database {where}: {str(exc).strip().splitlines()[0]}")
            time.sleep(min(2.0, 0.25 * attempt))


def ensure_database(env: Mapping[str, str], dbname: str) -> None:
    from psycopg import errors, sql

    with _connect(env, env["DB_NAME"]) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if row is not None:
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            log(f"created database {dbname}")
        except errors.DuplicateDatabase:
            pass  # another replica was quicker
        except errors.InsufficientPrivilege as exc:
            raise SystemExit(
                f"database {dbname} does not exist and user {env['DB_USER']} may not create it: "
                "create it, or give the user CREATEDB"
            ) from exc


def _run(cmd: list[str], env: Mapping[str, str]) -> None:
    shown = [part if "://" not in part else part.split("://", 1)[0] + "://..." for part in cmd]
    log("running " + " ".join(shown))
    subprocess.run(cmd, check=True, env=dict(env))


def migrate(env: Mapping[str, str]) -> None:
    wait_for_database(env)
    auth = _flag(env, "AUTH_ENABLED")
    if auth and _flag(env, "AUTH_CREATE_DB"):
        ensure_database(env, env["AUTH_DB_NAME"])
    python = sys.executable
    # The lock lives as long as this connection; a crashed migrator releases it by dying.
    with _connect(env, env["DB_NAME"], timeout=10) as lock_conn:
        log("waiting for the migration lock")
        lock_conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        log("holding the migration lock")
        _run([python, "-m", "mlflow", "db", "upgrade", sqlalchemy_uri(env, env["DB_NAME"])], env)
        if auth:
            _run(
                [python, "-m", "mlflow.server.auth", "db", "upgrade", "--url",
                 sqlalchemy_uri(env, env["AUTH_DB_NAME"])],
                env,
            )  # fmt: skip
        lock_conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    log("schema is current")


def write_auth_config(env: Mapping[str, str], path: str | None = None) -> str:
    path = path or AUTH_CONFIG_PATH
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    lines = [
        "[mlflow]",
        f"default_permission = {env.get('AUTH_DEFAULT_PERMISSION', 'READ')}",
        # ConfigParser interpolates '%': double it in the (quoted) URI.
        f"database_uri = {sqlalchemy_uri(env, env['AUTH_DB_NAME']).replace('%', '%%')}",
        f"admin_username = {env.get('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def server_command(env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    out_env = dict(env)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "0.0.0.0",
        "--port", env.get("MLFLOW_PORT", "5000"),
        "--workers", env.get("MLFLOW_WORKERS", "2"),
        "--serve-artifacts",
        "--artifacts-destination", env["MLFLOW_ARTIFACTS_DESTINATION"],
    ]  # fmt: skip
    # Through the environment (click's envvar), not argv: the password stays out of `ps`.
    out_env["MLFLOW_BACKEND_STORE_URI"] = sqlalchemy_uri(env, env["DB_NAME"])
    if env.get("MLFLOW_ALLOWED_HOSTS"):
        cmd += ["--allowed-hosts", env["MLFLOW_ALLOWED_HOSTS"]]
    if env.get("MLFLOW_CORS_ALLOWED_ORIGINS"):
        cmd += ["--cors-allowed-origins", env["MLFLOW_CORS_ALLOWED_ORIGINS"]]
    if _flag(env, "AUTH_ENABLED"):
        out_env["MLFLOW_AUTH_CONFIG_PATH"] = write_auth_config(env)
        cmd += ["--app-name", "basic-auth"]
    cmd += [str(arg) for arg in json.loads(env.get("MLFLOW_EXTRA_ARGS") or "[]")]
    return cmd, out_env


def serve(env: Mapping[str, str]) -> None:
    cmd, out_env = server_command(env)
    log("starting mlflow server on port " + env.get("MLFLOW_PORT", "5000"))
    os.execve(cmd[0], cmd, out_env)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("migrate", "serve"):
        print(f"usage: {argv[0]} migrate|serve", file=sys.stderr)
        return 2
    if argv[1] == "migrate":
        migrate(os.environ)
    else:
        serve(os.environ)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
