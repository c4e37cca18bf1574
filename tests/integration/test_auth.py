"""Credentials and TLS against a real MLflow server: what a user sees when they are right, and when not.

- **Basic auth**: MLflow's own ``basic-auth`` app (``mlflow server --app-name basic-auth``), with its
  own user database; the client sends ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``.
- **Token**: MLflow clients send ``Authorization: Bearer $MLFLOW_TRACKING_TOKEN``, which MLflow's
  basic-auth app does not read (it authenticates ``request.authorization.username``/``password``
  only), so the token is checked by a real reverse proxy in front of the server, as a gateway would.
- **HTTPS**: the same proxy serving TLS with a self-signed certificate made here; the client trusts it
  through ``MLFLOW_TRACKING_SERVER_CERT_PATH``, or skips verification with
  ``MLFLOW_TRACKING_INSECURE_TLS=true``.

With the right settings, every path of the exporter uses them: REST calls, OTLP ``/v1/traces`` and the
artifact upload of a prompt above the content bound, also from the writer process. With wrong ones,
``genai-mlflow doctor`` says what is wrong and how to fix it, the exporter logs it, and the app's
calls return their normal result, unharmed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Run, Trace

import genai_mlflow
from genai_mlflow.exporter.spool import Spool
from genai_mlflow.setup import Handle
from tests.mlflow_stack import MlflowStack, mlflow_stack
from tests.reverse_proxy import ReverseProxy, TlsFiles, self_signed_cert

TODAY = datetime.now(UTC).strftime("%Y-%m-%d")
MODEL = "gpt-4o-mini"
BIN = Path(sys.executable).parent
FAST_CALL_S = 1.0  # an app's LLM call against a local server, whatever MLflow answers
LAND_S = 90.0
TRACE_ID_TAG = "genai_mlflow.trace_id"
OFFLOADED = "genai_mlflow.offloaded"
EXPORTER_LOGGER = "genai_mlflow.exporter"
# Everything a client reads to reach a server; cleared before each test sets its own.
CLIENT_SETTINGS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
    "GENAI_MLFLOW_WRITER",
)


# --- the servers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthServer:
    """An MLflow server running MLflow's basic-auth app, and its users."""

    stack: MlflowStack
    admin: tuple[str, str]
    writer: tuple[str, str]
    """A plain user: may create experiments, and owns those it creates."""
    reader: tuple[str, str]
    """A plain user with the default permission (READ) on experiments of others."""

    @property
    def uri(self) -> str:
        return self.stack.tracking_uri


def _password() -> str:
    return secrets.token_urlsafe(18)  # MLflow wants at least 12 characters


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    tmp = tmp_path_factory.mktemp("auth-stack")
    admin = ("admin", _password())
    config = tmp / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        # The auth app's users and permissions, in a database apart from the tracking store.
        f"database_uri = sqlite:///{tmp / 'basic_auth.db'}\n"
        f"admin_username = {admin[0]}\n"
        f"admin_password = {admin[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server_env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        # The auth app refuses to start without a fixed key for its CSRF protection.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    with mlflow_stack(tmp, server_args=("--app-name", "basic-auth"), server_env=server_env) as stack:
        users = {name: (name, _password()) for name in ("writer", "reader")}
        for username, password in users.values():
            created = requests.post(
                f"{stack.tracking_uri}/api/2.0/mlflow/users/create",
                json={"username": username, "password": password},
                auth=admin,
                timeout=30,
            )
            assert created.status_code == 200, created.text
        yield AuthServer(stack, admin, users["writer"], users["reader"])


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def token_proxy(mlflow_server: MlflowStack, token: str) -> Iterator[ReverseProxy]:
    """The plain session server behind a gateway that wants ``Authorization: Bearer <token>``."""
    if not mlflow_server.running:
        mlflow_server.start_mlflow()
    with ReverseProxy(mlflow_server.tracking_uri, token=token) as proxy:
        yield proxy


@pytest.fixture
def tls_proxy(mlflow_server: MlflowStack, tls_files: TlsFiles) -> Iterator[ReverseProxy]:
    """The plain session server behind HTTPS with a self-signed certificate."""
    if not mlflow_server.running:
        mlflow_server.start_mlflow()
    with ReverseProxy(mlflow_server.tracking_uri, tls=tls_files) as proxy:
        yield proxy


# --- the client side -----------------------------------------------------------------------------


def use_server(monkeypatch: pytest.MonkeyPatch, stack: MlflowStack, uri: str, **settings: str) -> None:
    """Point this process (and what it starts) at ``uri`` with exactly these client settings."""
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for key in CLIENT_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)


def basic(user: tuple[str, str]) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user[0], "MLFLOW_TRACKING_PASSWORD": user[1]}


@dataclass
class Calls:
    """What the app asked and got back."""

    small: Any
    large: Any
    large_prompt: str


def make_calls(client: openai.OpenAI, persona: str) -> Calls:
    """A small call, and one whose prompt is above the content bound (16 KiB): it goes to artifacts."""
    large_prompt = os.urandom(20_000).hex()  # 40,000 characters
    with genai_mlflow.persona(persona):
        small = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0.2
        )
        large = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": large_prompt}]
        )
    assert small.choices[0].message.content == "You said: What is 2+2?"
    return Calls(small, large, large_prompt)


def _llm_span_attributes(found: Trace) -> dict[str, Any]:
    [span] = [s for s in found.data.spans if "gen_ai.operation.name" in s.attributes]
    return dict(span.attributes)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def assert_landed(mlflow: MlflowClient, persona: str, calls: Calls, tmp_path: Path) -> list[Run]:
    """What a user checks: the day's experiment of the persona, a finished run per call with its
    params and metrics, each run's trace linked to it, and the large prompt in the run's artifacts."""
    experiment = mlflow.get_experiment_by_name(f"{persona}_{TODAY}")
    assert experiment is not None, f"no experiment {persona}_{TODAY}"
    assert experiment.tags["genai_mlflow.persona"] == persona
    assert experiment.tags["genai_mlflow.date"] == TODAY
    runs = mlflow.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    for run, answer in zip(runs, (calls.small, calls.large), strict=True):
        assert run.info.status == "FINISHED"
        assert run.data.params["model"] == answer.model
        assert run.data.params["provider"] == "openai"
        assert run.data.params["operation"] == "chat"
        assert run.data.metrics["prompt_tokens"] == answer.usage.prompt_tokens
        assert run.data.metrics["completion_tokens"] == answer.usage.completion_tokens
        assert run.data.metrics["total_tokens"] == answer.usage.total_tokens
        assert run.data.metrics["llm_calls"] == 1
        [linked] = mlflow.search_traces(locations=[experiment.experiment_id], run_id=run.info.run_id)
        assert linked.info.trace_id == f"tr-{run.data.tags[TRACE_ID_TAG]}"
        assert linked.info.state.value == "OK"
    assert runs[0].data.params["request.temperature"] == "0.2"

    # The large prompt: a reference on the span, the whole text in the run's artifacts.
    large_run = runs[1]
    [found] = mlflow.search_traces(locations=[experiment.experiment_id], run_id=large_run.info.run_id)
    reference = _json(_llm_span_attributes(found)["gen_ai.input.messages"])
    location = reference[OFFLOADED]
    prefix = f"runs:/{large_run.info.run_id}/"
    assert location.startswith(prefix)
    local = Path(
        mlflow.download_artifacts(large_run.info.run_id, location.removeprefix(prefix), str(tmp_path))
    )
    assert calls.large_prompt in local.read_text(encoding="utf-8")
    return list(runs)


def instrument(spool_dir: Path, uri: str, **options: Any) -> Handle:
    return genai_mlflow.instrument(uri, spool_dir=str(spool_dir), **options)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


def exporter_records(caplog: pytest.LogCaptureFixture, *needles: str) -> list[logging.LogRecord]:
    """The exporter's warnings and errors whose message contains every one of ``needles``."""
    return [
        r
        for r in caplog.records
        if r.name.startswith(EXPORTER_LOGGER)
        and r.levelno >= logging.WARNING
        and all(n.lower() in r.getMessage().lower() for n in needles)
    ]


def assert_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong setting is a logged line, never an exception's traceback."""
    noisy = [r for r in caplog.records if r.name.startswith("genai_mlflow") and r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


def app_call_is_unharmed(client: openai.OpenAI, persona: str) -> None:
    """The app's call returns its normal result, fast, however MLflow answers."""
    started = time.perf_counter()
    with genai_mlflow.persona(persona):
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert time.perf_counter() - started < FAST_CALL_S
    assert answer.choices[0].message.content == "You said: hello"


# --- the doctor ----------------------------------------------------------------------------------


def run_doctor(uri: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``genai-mlflow doctor`` with this process's environment (the test's client settings)."""
    env = {**os.environ, "GENAI_MLFLOW_SPOOL_DIR": str(tmp_path / "doctor-spool"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(BIN / "genai-mlflow"), "doctor", "--tracking-uri", uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def doctor_failure(result: subprocess.CompletedProcess[str], check: str) -> tuple[str, str]:
    """The ``FAIL <check>`` line and its ``fix:`` line; the doctor must have exited non-zero."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(f"FAIL {check}")]
    assert failed, output
    fix = lines[lines.index(failed[0]) + 1]
    assert fix.startswith("fix:"), output
    return failed[0], fix


def assert_doctor_ok(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    checks = [line for line in result.stdout.splitlines()[1:] if line.strip()]
    assert len(checks) >= 6, output
    assert all(line.startswith("ok ") for line in checks), output


# --- 1. basic auth: MLflow's basic-auth app -------------------------------------------------------


def test_basic_auth_is_really_on(auth_server: AuthServer):
    anonymous = requests.get(f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert anonymous.status_code == 401
    admin = requests.get(
        f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=1",
        auth=auth_server.admin,
        timeout=10,
    )
    assert admin.status_code == 200


def test_basic_auth_call_lands_with_its_run_trace_and_artifact(
    auth_server: AuthServer,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    use_server(monkeypatch, auth_server.stack, auth_server.uri, **basic(auth_server.writer))
    handle = instrument(spool_dir, auth_server.uri)
    try:
        calls = make_calls(client, persona_name)
        assert handle.flush(LAND_S)
    finally:
        handle.shutdown()
    assert_landed(MlflowClient(auth_server.uri), persona_name, calls, tmp_path)


def test_basic_auth_writer_process_gets_the_credentials(
    auth_server: AuthServer,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    use_server(monkeypatch, auth_server.stack, auth_server.uri, **basic(auth_server.writer))
    handle = instrument(spool_dir, auth_server.uri, writer="process")
    try:
        pipeline = handle.pipeline
        assert pipeline is not None and pipeline.drain_process is not None
        calls = make_calls(client, persona_name)
        assert handle.flush(LAND_S)  # in this mode: the spool is empty, the writer process landed it
        # The app's own writer only stood by: what landed, the writer process wrote.
        assert pipeline.drain_process.poll() is None
        assert not pipeline.writer.draining
        assert pipeline.writer.landed == 0
    finally:
        handle.shutdown()
    assert_landed(MlflowClient(auth_server.uri), persona_name, calls, tmp_path)


def test_basic_auth_doctor_is_all_ok_with_the_right_password(
    auth_server: AuthServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    use_server(monkeypatch, auth_server.stack, auth_server.uri, **basic(auth_server.writer))
    assert_doctor_ok(run_doctor(auth_server.uri, tmp_path))


def test_basic_auth_wrong_password_doctor_says_so_and_how_to_fix_it(
    auth_server: AuthServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    wrong = _password()
    use_server(monkeypatch, auth_server.stack, auth_server.uri, **basic((auth_server.writer[0], wrong)))
    result = run_doctor(auth_server.uri, tmp_path)
    failed, fix = doctor_failure(result, "server")
    assert "401" in failed
    assert "not authorised" in failed
    assert "MLFLOW_TRACKING_USERNAME" in fix
    assert "MLFLOW_TRACKING_PASSWORD" in fix
    assert wrong not in result.stdout + result.stderr  # a password is never printed


def test_basic_auth_wrong_password_is_logged_and_the_app_is_unharmed(
    auth_server: AuthServer,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    wrong = _password()
    use_server(monkeypatch, auth_server.stack, auth_server.uri, **basic((auth_server.writer[0], wrong)))
    caplog.set_level(logging.WARNING, logger="genai_mlflow")
    handle = instrument(spool_dir, auth_server.uri)
    try:
        app_call_is_unharmed(client, persona_name)
        wait_until(lambda: bool(exporter_records(caplog, "401")), 15, "a log line saying MLflow answered 401")
        assert handle.flush(5) is False  # nothing landed, and flush does not pretend it did
    finally:
        handle.shutdown(timeout_s=1)
    assert_no_tracebacks(caplog)
    assert all(wrong not in r.getMessage() for r in caplog.records)
    found = requests.get(
        f"{auth_server.uri}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": f"{persona_name}_{TODAY}"},
        auth=auth_server.admin,
        timeout=10,
    )
    assert found.status_code == 404  # no experiment was made with the wrong password
    with Spool(spool_dir) as spool:
        assert spool.status().pending_records == 1  # kept for `genai-mlflow spool replay`


def test_basic_auth_user_without_permission_gets_403_logged_once_and_not_retried(
    auth_server: AuthServer,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    # The persona's experiment of the day exists, made by the admin: the reader may read it only.
    created = requests.post(
        f"{auth_server.uri}/api/2.0/mlflow/experiments/create",
        json={"name": f"{persona_name}_{TODAY}"},
        auth=auth_server.admin,
        timeout=10,
    )
    assert created.status_code == 200, created.text
    experiment_id = created.json()["experiment_id"]
    use_server(monkeypatch, auth_server.stack, auth_server.uri, **basic(auth_server.reader))
    caplog.set_level(logging.WARNING, logger="genai_mlflow")
    handle = instrument(spool_dir, auth_server.uri)
    try:
        app_call_is_unharmed(client, persona_name)
        wait_until(lambda: bool(exporter_records(caplog, "403")), 15, "a log line saying MLflow answered 403")
        [denied] = exporter_records(caplog, "403")
        assert "not retry" in denied.getMessage()
        # Given up, not retried until a timeout: flush says so at once.
        started = time.monotonic()
        assert handle.flush(30) is False
        elapsed = time.monotonic() - started
        assert elapsed < 5, f"flush() waited {elapsed:.0f}s for a trace the writer had given up on"
        time.sleep(3)  # a retry loop would log again
        assert len(exporter_records(caplog, "403")) == 1
    finally:
        handle.shutdown(timeout_s=1)
    assert_no_tracebacks(caplog)
    searched = requests.post(
        f"{auth_server.uri}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id]},
        auth=auth_server.admin,
        timeout=10,
    )
    assert searched.status_code == 200
    assert searched.json().get("runs", []) == []
    with Spool(spool_dir) as spool:
        assert spool.status().pending_records == 1  # kept for a replay once permission is granted


# --- 2. a bearer token, checked by a gateway in front of MLflow -----------------------------------


def test_token_call_lands_and_every_request_carries_it(
    mlflow_server: MlflowStack,
    token_proxy: ReverseProxy,
    token: str,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    assert requests.get(f"{token_proxy.url}/version", timeout=10).status_code == 401
    use_server(monkeypatch, mlflow_server, token_proxy.url, MLFLOW_TRACKING_TOKEN=token)
    handle = instrument(spool_dir, token_proxy.url)
    try:
        calls = make_calls(client, persona_name)
        assert handle.flush(LAND_S)
    finally:
        handle.shutdown()
    exporter_requests = token_proxy.requests()[1:]  # after the anonymous probe above
    assert exporter_requests
    assert all(s.authorization == "Bearer" and s.forwarded for s in exporter_requests), exporter_requests
    # Through the proxy, with the token: the OTLP protobuf traces and the artifact upload too.
    assert any(
        s.method == "POST" and s.path == "/v1/traces" and s.content_type == "application/x-protobuf"
        for s in exporter_requests
    )
    assert any(
        s.method == "PUT"
        and s.path.startswith("/api/2.0/mlflow-artifacts/artifacts/")
        and s.body_bytes > 40_000
        for s in exporter_requests
    )
    assert_landed(MlflowClient(token_proxy.url), persona_name, calls, tmp_path)


def test_token_doctor_is_all_ok_with_the_right_token(
    mlflow_server: MlflowStack,
    token_proxy: ReverseProxy,
    token: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    use_server(monkeypatch, mlflow_server, token_proxy.url, MLFLOW_TRACKING_TOKEN=token)
    assert_doctor_ok(run_doctor(token_proxy.url, tmp_path))


def test_wrong_token_doctor_says_so_and_how_to_fix_it(
    mlflow_server: MlflowStack, token_proxy: ReverseProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    wrong = secrets.token_urlsafe(24)
    use_server(monkeypatch, mlflow_server, token_proxy.url, MLFLOW_TRACKING_TOKEN=wrong)
    result = run_doctor(token_proxy.url, tmp_path)
    failed, fix = doctor_failure(result, "server")
    assert "401" in failed
    assert "not authorised" in failed
    assert "MLFLOW_TRACKING_TOKEN" in fix
    assert wrong not in result.stdout + result.stderr
    assert token_proxy.requests() and not token_proxy.forwarded()


def test_wrong_token_is_logged_and_the_app_is_unharmed(
    mlflow_server: MlflowStack,
    token_proxy: ReverseProxy,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    wrong = secrets.token_urlsafe(24)
    use_server(monkeypatch, mlflow_server, token_proxy.url, MLFLOW_TRACKING_TOKEN=wrong)
    caplog.set_level(logging.WARNING, logger="genai_mlflow")
    handle = instrument(spool_dir, token_proxy.url)
    try:
        app_call_is_unharmed(client, persona_name)
        wait_until(lambda: bool(exporter_records(caplog, "401")), 15, "a log line saying MLflow answered 401")
        assert handle.flush(5) is False
    finally:
        handle.shutdown(timeout_s=1)
    assert_no_tracebacks(caplog)
    assert all(wrong not in r.getMessage() for r in caplog.records)
    assert token_proxy.requests() and not token_proxy.forwarded()  # nothing got past the gateway
    assert mlflow_server.client().get_experiment_by_name(f"{persona_name}_{TODAY}") is None


# --- 3. HTTPS with a self-signed certificate ------------------------------------------------------


@pytest.mark.parametrize("trust", ["server cert path", "insecure tls"])
def test_https_call_lands_when_the_certificate_is_trusted_or_not_checked(
    trust: str,
    mlflow_server: MlflowStack,
    tls_proxy: ReverseProxy,
    tls_files: TlsFiles,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    settings = (
        {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(tls_files.cert)}
        if trust == "server cert path"
        else {"MLFLOW_TRACKING_INSECURE_TLS": "true"}
    )
    assert tls_proxy.url.startswith("https://")
    use_server(monkeypatch, mlflow_server, tls_proxy.url, **settings)
    handle = instrument(spool_dir, tls_proxy.url)
    try:
        calls = make_calls(client, persona_name)
        assert handle.flush(LAND_S)
    finally:
        handle.shutdown()
    seen = tls_proxy.requests()
    assert any(s.path == "/v1/traces" and s.status == 200 for s in seen)
    assert any(s.method == "PUT" and s.path.startswith("/api/2.0/mlflow-artifacts/") for s in seen)
    assert not tls_proxy.handshake_errors
    assert_landed(MlflowClient(tls_proxy.url), persona_name, calls, tmp_path)
    assert_doctor_ok(run_doctor(tls_proxy.url, tmp_path))


def test_https_untrusted_certificate_doctor_says_so_and_how_to_fix_it(
    mlflow_server: MlflowStack, tls_proxy: ReverseProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    use_server(monkeypatch, mlflow_server, tls_proxy.url)
    started = time.monotonic()
    result = run_doctor(tls_proxy.url, tmp_path)
    assert time.monotonic() - started < 60  # no retry loop on a certificate error
    failed, fix = doctor_failure(result, "server")
    assert "certificate" in failed.lower()
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in fix
    assert "MLFLOW_TRACKING_INSECURE_TLS" in fix
    assert tls_proxy.handshake_errors
    assert not tls_proxy.requests()


def test_https_uri_for_a_plain_http_server_doctor_says_to_use_http(
    mlflow_server: MlflowStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    uri = mlflow_server.tracking_uri.replace("http://", "https://", 1)
    use_server(monkeypatch, mlflow_server, uri)
    failed, fix = doctor_failure(run_doctor(uri, tmp_path), "server")
    assert "TLS handshake failed" in failed
    assert uri in failed
    assert "use http://" in fix


def test_https_untrusted_certificate_is_logged_and_the_app_is_unharmed(
    mlflow_server: MlflowStack,
    tls_proxy: ReverseProxy,
    client: openai.OpenAI,
    spool_dir: Path,
    persona_name: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    use_server(monkeypatch, mlflow_server, tls_proxy.url)
    caplog.set_level(logging.WARNING, logger="genai_mlflow")
    handle = instrument(spool_dir, tls_proxy.url)
    try:
        for _ in range(3):
            app_call_is_unharmed(client, persona_name)
        wait_until(
            lambda: bool(exporter_records(caplog, "cannot write to MLflow", "certificate")),
            30,
            "a warning that MLflow cannot be written because of its certificate",
        )
        assert handle.flush(2) is False
    finally:
        handle.shutdown(timeout_s=1)
    assert_no_tracebacks(caplog)
    assert tls_proxy.handshake_errors
    assert not tls_proxy.requests()  # no request got past the handshake
    assert mlflow_server.client().get_experiment_by_name(f"{persona_name}_{TODAY}") is None
