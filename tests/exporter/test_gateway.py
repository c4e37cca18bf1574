"""RestGateway against a local HTTP server: the credentials it sends, how it maps MLflow's answers
to retryable or not (the same as through MLflow's own client), and one lookup per new experiment."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from genai_mlflow.exporter.gateway import GatewayError, RestGateway
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.spool import Spool
from genai_mlflow.exporter.writer import Writer

CLIENT_SETTINGS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_TRACKING_AWS_SIGV4",
)


class FakeMlflow(ThreadingHTTPServer):
    """Answers every request with ``status`` and ``body``; keeps the headers it was sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.status = 200
        self.body: dict[str, Any] = {}
        self.headers_seen: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeMlflow

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.headers_seen.append(dict(self.headers))
        payload = json.dumps(self.server.body).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def no_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLIENT_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_mlflow() -> Iterator[FakeMlflow]:
    server = FakeMlflow()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# Credentials


def test_basic_auth_and_mlflows_user_agent_on_every_request(
    fake_mlflow: FakeMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "writer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret:x")
    gateway = RestGateway(fake_mlflow.url)
    gateway.end_run("r1", "FINISHED", 1)
    gateway.log_batch("r1", {"model": "m"}, [], {})

    assert len(fake_mlflow.headers_seen) == 2
    for headers in fake_mlflow.headers_seen:
        assert headers["Authorization"] == "Basic " + base64.b64encode(b"writer:s3cret:x").decode()
        assert headers["User-Agent"].startswith("mlflow-python-client/")


def test_a_token_is_sent_as_bearer(fake_mlflow: FakeMlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123")
    RestGateway(fake_mlflow.url).end_run("r1", "FINISHED", 1)
    assert fake_mlflow.headers_seen[0]["Authorization"] == "Bearer tok-123"


def test_no_credentials_no_authorization(fake_mlflow: FakeMlflow) -> None:
    RestGateway(fake_mlflow.url).end_run("r1", "FINISHED", 1)
    assert "Authorization" not in fake_mlflow.headers_seen[0]


@pytest.mark.parametrize(
    ("settings", "verify", "cert"),
    [
        ({}, True, None),
        ({"MLFLOW_TRACKING_INSECURE_TLS": "true"}, False, None),
        ({"MLFLOW_TRACKING_SERVER_CERT_PATH": "/etc/ca.pem"}, "/etc/ca.pem", None),
        ({"MLFLOW_TRACKING_CLIENT_CERT_PATH": "/etc/client.pem"}, True, "/etc/client.pem"),
    ],
)
def test_tls_settings_are_applied_as_mlflow_applies_them(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, str], verify: bool | str, cert: str | None
) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    gateway = RestGateway("https://mlflow.invalid")
    assert gateway._client is not None
    assert gateway._client.options["verify"] == verify
    assert gateway._client.options.get("cert") == cert
    assert gateway._creds.verify == verify  # what MLflow's http_request would pass


@pytest.mark.parametrize(
    "setting", [("MLFLOW_TRACKING_AUTH", "my_auth_plugin"), ("MLFLOW_TRACKING_AWS_SIGV4", "true")]
)
def test_credentials_only_mlflow_can_apply_go_through_mlflows_client(
    monkeypatch: pytest.MonkeyPatch, setting: tuple[str, str]
) -> None:
    monkeypatch.setenv(*setting)
    assert RestGateway("http://mlflow.invalid")._client is None


def test_the_writer_keeps_a_connection_per_worker(tmp_path: Any) -> None:
    gateway = RestGateway("http://mlflow.invalid")
    with Spool(str(tmp_path / "spool")) as spool:
        writer = Writer(spool, gateway, PriceTable.load(), workers=24)
        writer.shutdown(0.1)
    assert gateway._client is not None
    assert gateway._client.session.get_adapter("http://mlflow.invalid")._pool_maxsize == 24  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Errors: retryable or not, the same as through MLflow's http_request


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (408, True),
        (429, True),
        (500, True),
        (503, True),
    ],
)
def test_errors_map_as_through_mlflows_client(fake_mlflow: FakeMlflow, status: int, retryable: bool) -> None:
    fake_mlflow.status = status
    fake_mlflow.body = {"error_code": "SOMETHING", "message": "no"}
    own = RestGateway(fake_mlflow.url)
    mlflows = RestGateway(fake_mlflow.url)
    mlflows._client = None  # MLflow's http_request, as for credentials it alone can apply
    for gateway in (own, mlflows):
        with pytest.raises(GatewayError) as raised:
            gateway.end_run("r1", "FINISHED", 1)
        assert raised.value.retryable is retryable


def test_a_closed_port_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it once closed
    with pytest.raises(GatewayError) as raised:
        RestGateway(f"http://127.0.0.1:{port}").end_run("r1", "FINISHED", 1)
    assert raised.value.retryable


def test_a_missing_experiment_is_created(fake_mlflow: FakeMlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def api(method: str, path: str, **kwargs: Any) -> Any:
        asked.append(path)
        if path == "experiments/get-by-name":
            raise GatewayError("GET answered 404: RESOURCE_DOES_NOT_EXIST", retryable=False)
        return {"experiment_id": "7"}

    gateway = RestGateway(fake_mlflow.url)
    monkeypatch.setattr(gateway, "_api", api)
    assert gateway.experiment_id("bot_2026-01-01", {}) == "7"
    assert gateway.experiment_id("bot_2026-01-01", {}) == "7"
    assert asked == ["experiments/get-by-name", "experiments/create"]


# ---------------------------------------------------------------------------------------------
# One lookup per new experiment


def test_concurrent_workers_meeting_a_new_experiment_make_one_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    release = threading.Event()

    def api(method: str, path: str, **kwargs: Any) -> Any:
        asked.append(path)
        release.wait(5.0)
        return {"experiment": {"experiment_id": "42", "lifecycle_stage": "active"}}

    gateway = RestGateway("http://mlflow.invalid")
    monkeypatch.setattr(gateway, "_api", api)
    workers = 16
    start = threading.Barrier(workers + 1)
    got: list[str] = []

    def work() -> None:
        start.wait()
        got.append(gateway.experiment_id("bot_2026-01-01", {}))

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(0.3)  # every worker has met the name by now
    release.set()
    for thread in threads:
        thread.join(10.0)
    assert got == ["42"] * workers
    assert asked == ["experiments/get-by-name"]


def test_a_failed_lookup_fails_its_waiters_and_the_next_caller_tries_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: list[Any] = [GatewayError("GET answered 503: busy"), {"experiment": {"experiment_id": "9"}}]
    release = threading.Event()

    def api(method: str, path: str, **kwargs: Any) -> Any:
        release.wait(5.0)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    gateway = RestGateway("http://mlflow.invalid")
    monkeypatch.setattr(gateway, "_api", api)
    start = threading.Barrier(5)
    errors: list[GatewayError] = []

    def work() -> None:
        start.wait()
        try:
            gateway.experiment_id("bot_2026-01-01", {})
        except GatewayError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(0.3)  # every worker has met the name by now
    release.set()
    for thread in threads:
        thread.join(10.0)
    assert len(errors) == 4 and all(e.retryable for e in errors)
    assert gateway.experiment_id("bot_2026-01-01", {}) == "9"
