"""Failure modes against the real stack: what a user finds in MLflow after things went wrong.

- MLflow down when the app starts, and killed and restarted while the app makes calls;
- the app killed (SIGKILL) with calls still in its spool, then a replay;
- forked workers (gunicorn ``--preload``, and a plain ``os.fork()``);
- a wrong tracking URI, and a server that wants credentials.

Every LLM call must land exactly once (one run and one trace each), the app's calls must stay fast
and never raise because of MLflow, and what cannot be written is said, in the log or by the doctor.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run, Trace

import genai_mlflow
from genai_mlflow.exporter.spool import Spool
from genai_mlflow.setup import Handle
from genai_mlflow.stack import free_port, stop_process
from genai_mlflow.testing.openai_server import OpenAIServer
from tests.mlflow_stack import MlflowStack

TODAY = datetime.now(UTC).strftime("%Y-%m-%d")
MODEL = "gpt-4o-mini"
BIN = Path(sys.executable).parent
SUBPROCESS_TIMEOUT_S = 120.0
FAST_CALL_S = 1.0  # an app's LLM call against a local server, whatever MLflow is doing
TRACE_ID_TAG = "genai_mlflow.trace_id"
# A bound on landing what waited out an outage, once MLflow answers again: the writer's circuit
# breaker half-opens after a jittered cooldown that doubles per failed round (at most 60 s), then
# everything goes. flush() returns as soon as it has landed.
RECOVERY_S = 180.0


# --- what landed ---------------------------------------------------------------------------------


def _experiment_id(mlflow: MlflowClient, persona: str) -> str | None:
    experiment = mlflow.get_experiment_by_name(f"{persona}_{TODAY}")
    return None if experiment is None else experiment.experiment_id


def _runs(mlflow: MlflowClient, persona: str) -> list[Run]:
    experiment_id = _experiment_id(mlflow, persona)
    if experiment_id is None:
        return []
    return list(mlflow.search_runs([experiment_id], max_results=5000))


def _traces(mlflow: MlflowClient, experiment_id: str) -> list[Trace]:
    found: list[Trace] = []
    token = None
    while True:
        page = mlflow.search_traces(
            locations=[experiment_id], max_results=100, page_token=token, include_spans=False
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def assert_each_call_landed_once(
    mlflow: MlflowClient, persona: str, calls: int, *, check_links: int | None = None
) -> list[Run]:
    """``calls`` runs and ``calls`` traces in the persona's experiment, one of each per trace id, and
    each trace linked to its run (all of them, or the first ``check_links``)."""
    experiment_id = _experiment_id(mlflow, persona)
    assert experiment_id is not None, f"no experiment {persona}_{TODAY}"
    runs = _runs(mlflow, persona)
    trace_ids = [run.data.tags[TRACE_ID_TAG] for run in runs]
    duplicates = sorted({t for t in trace_ids if trace_ids.count(t) > 1})
    assert not duplicates, f"duplicate runs for traces {duplicates}"
    assert len(runs) == calls
    assert all(run.info.status == "FINISHED" for run in runs)
    assert all(run.data.metrics["llm_calls"] == 1 for run in runs)
    traces = _traces(mlflow, experiment_id)
    assert sorted(t.info.trace_id for t in traces) == sorted(f"tr-{t}" for t in trace_ids)
    for run in runs[:check_links]:
        linked = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id, include_spans=False)
        assert [t.info.trace_id for t in linked] == [f"tr-{run.data.tags[TRACE_ID_TAG]}"]
    return runs


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def timed_call(client: openai.OpenAI, text: str) -> float:
    started = time.perf_counter()
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    return time.perf_counter() - started


# --- subprocesses --------------------------------------------------------------------------------


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment (``mlflow_env`` has put the stack's client settings in it), with a
    cache directory of the test's own, so that no default spool is shared with anything else."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("GENAI_MLFLOW_SPOOL_DIR", None)
    env.update(extra)
    return env


def write_script(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def run_cli(
    *args: str, env: dict[str, str], timeout: float = SUBPROCESS_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "genai-mlflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def replay_cli(
    uri: str, spool: Path, *, env: dict[str, str], timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    args = ("spool", "replay", "--tracking-uri", uri, "--spool-dir", str(spool), "--timeout", str(timeout))
    return run_cli(*args, env=env, timeout=timeout + 30)


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout_s: float) -> bytes:
    """Read ``proc``'s stdout until ``marker`` appears; fail at the timeout or if it exits first."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + timeout_s
    try:
        while marker not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} within {timeout_s:.0f}s; output so far: {seen!r}")
            if selector.select(min(remaining, 0.5)):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"exited with {proc.wait(5)} before {marker!r}: {seen!r}")
                seen += chunk
    finally:
        selector.close()
    return seen


# --- 1. MLflow down when the app starts ----------------------------------------------------------


def test_mlflow_down_at_start_calls_stay_fast_and_land_once_it_is_back(
    mlflow_env: MlflowStack, spool_dir: Path, client: openai.OpenAI, persona_name: str
):
    calls = 8
    handle: Handle | None = None
    try:
        with mlflow_env.outage():
            started = time.perf_counter()
            handle = genai_mlflow.instrument(mlflow_env.tracking_uri, spool_dir=str(spool_dir))
            assert time.perf_counter() - started < FAST_CALL_S
            with genai_mlflow.persona(persona_name):
                latencies = [timed_call(client, f"question {i}") for i in range(calls)]
            assert max(latencies) < FAST_CALL_S, latencies
            assert handle.flush(2) is False  # nothing can land while MLflow is down
        # MLflow is back (outage() waited for /health).
        assert handle.flush(RECOVERY_S)
    finally:
        if handle is not None:
            handle.shutdown(timeout_s=5)
    assert_each_call_landed_once(mlflow_env.client(), persona_name, calls)


# --- 2. MLflow killed while the app makes calls, and restarted ----------------------------------


def test_mlflow_killed_mid_run_and_restarted_lands_every_call_once(
    handle: Handle,
    client: openai.OpenAI,
    mlflow_env: MlflowStack,
    persona_name: str,
):
    latencies: list[float] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def app() -> None:
        try:
            with genai_mlflow.persona(persona_name):
                while not stop.is_set():
                    latencies.append(timed_call(client, f"call {len(latencies)}"))
                    time.sleep(0.2)
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    mlflow = mlflow_env.client()
    worker = threading.Thread(target=app, name="app-calls", daemon=True)
    worker.start()
    try:
        # MLflow is being written to when it is killed: some runs have landed already.
        wait_until(lambda: len(_runs(mlflow, persona_name)) >= 5, 30, "the first runs to land")
        with mlflow_env.outage(grace=0):  # SIGKILL: requests in flight are cut off
            time.sleep(1.0)
        time.sleep(1.0)  # and calls go on after the restart
    finally:
        stop.set()
        worker.join(30)
    assert not worker.is_alive()
    assert not failures, failures
    calls = len(latencies)
    assert calls > 10
    assert max(latencies) < FAST_CALL_S, max(latencies)

    assert handle.flush(RECOVERY_S), f"{len(_runs(mlflow, persona_name))} of {calls} calls landed"
    assert_each_call_landed_once(mlflow, persona_name, calls, check_links=10)


# --- 3. The app killed with calls in its spool ---------------------------------------------------

APP_KILLED = """
    import sys, time
    import openai
    import genai_mlflow

    uri, spool_dir, base_url, persona, calls = sys.argv[1:6]
    genai_mlflow.instrument(uri, spool_dir=spool_dir)
    client = openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
    with genai_mlflow.persona(persona):
        for i in range(int(calls)):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"call {i}"}]
            )
    # Each span reaches the spool a moment after its call returns (finished off the app's thread):
    # the kill comes after that moment, as the test is about what the spool holds.
    from genai_mlflow.instrumentation.openai.finisher import FINISHER
    FINISHER.flush(10)
    print("done", flush=True)
    time.sleep(600)  # killed by the test
"""

APP_REPLAY = """
    import sys
    import genai_mlflow

    uri, spool_dir = sys.argv[1:3]
    handle = genai_mlflow.instrument(uri, spool_dir=spool_dir)
    print("flushed" if handle.flush(90) else "not flushed", flush=True)
    handle.shutdown()
"""


def test_app_killed_with_calls_in_its_spool_then_a_replay_lands_each_once(
    mlflow_env: MlflowStack, server: OpenAIServer, tmp_path: Path
):
    calls = 6
    uri = mlflow_env.tracking_uri
    env = subprocess_env(tmp_path)
    app = write_script(tmp_path, "app_killed.py", APP_KILLED)
    # Two apps: one replayed by `genai-mlflow spool replay`, one by the next app's instrument().
    personas = {
        "cli": f"killed_cli_{os.urandom(4).hex()}",
        "restart": f"killed_restart_{os.urandom(4).hex()}",
    }
    spools = {how: tmp_path / f"spool-{how}" for how in personas}

    with mlflow_env.outage():
        procs = {
            how: subprocess.Popen(
                [sys.executable, str(app), uri, str(spools[how]), server.base_url, personas[how], str(calls)],
                env=env,
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            for how in personas
        }
        try:
            for proc in procs.values():
                read_until(proc, b"done", 60)
        finally:
            for proc in procs.values():
                proc.kill()  # SIGKILL: no atexit, no flush
                proc.wait(10)
        # What a person checks first: the calls are waiting in the spool.
        status = run_cli("spool", "status", "--tracking-uri", uri, "--spool-dir", str(spools["cli"]), env=env)
        assert status.returncode == 0, status.stderr
        assert f"records waiting: {calls} " in status.stdout, status.stdout
        with Spool(spools["restart"]) as spool:
            assert spool.status().pending_records == calls

    mlflow = mlflow_env.client()
    assert _runs(mlflow, personas["cli"]) == []  # nothing landed before the kill

    replay = replay_cli(uri, spools["cli"], env=env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"{calls} traces landed, 0 records left" in replay.stdout

    restarted = subprocess.run(
        [
            sys.executable,
            str(write_script(tmp_path, "app_replay.py", APP_REPLAY)),
            uri,
            str(spools["restart"]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.strip() == "flushed", restarted.stderr

    for persona in personas.values():
        assert_each_call_landed_once(mlflow, persona, calls)

    again = replay_cli(uri, spools["cli"], env=env, timeout=30)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 traces landed, 0 records left" in again.stdout
    assert_each_call_landed_once(mlflow, personas["cli"], calls)


# --- 4. Forked workers ---------------------------------------------------------------------------

WSGI_APP = """
    import json, os
    import openai
    import genai_mlflow

    # --preload: this runs once, in the gunicorn master, before it forks the workers.
    HANDLE = genai_mlflow.instrument(os.environ["APP_TRACKING_URI"], spool_dir=os.environ["APP_SPOOL_DIR"])
    PERSONA = os.environ["APP_PERSONA"]
    _clients = {}


    def _client():
        # One HTTP client per process: connection pools must not cross a fork.
        pid = os.getpid()
        if pid not in _clients:
            _clients[pid] = openai.OpenAI(
                base_url=os.environ["APP_OPENAI_URL"], api_key="test-key", max_retries=0
            )
        return _clients[pid]


    def app(environ, start_response):
        with genai_mlflow.persona(PERSONA):
            answer = _client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": environ["PATH_INFO"]}]
            )
        body = json.dumps({"pid": os.getpid(), "id": answer.id}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
"""


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_gunicorn_preload_workers_land_every_call_once(
    mlflow_env: MlflowStack, server: OpenAIServer, tmp_path: Path, persona_name: str
):
    requests = 10
    port = free_port()
    spool = tmp_path / "spool"
    write_script(tmp_path, "wsgi_app.py", WSGI_APP)
    env = subprocess_env(
        tmp_path,
        APP_TRACKING_URI=mlflow_env.tracking_uri,
        APP_SPOOL_DIR=str(spool),
        APP_PERSONA=persona_name,
        APP_OPENAI_URL=server.base_url,
    )
    log_path = tmp_path / "gunicorn.log"
    gunicorn_args = [f"--chdir={tmp_path}", "--graceful-timeout=20", "wsgi_app:app"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "--preload", "--workers=2", f"--bind=127.0.0.1:{port}", *gunicorn_args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until(lambda: _port_open(port) or proc.poll() is not None, 60, "gunicorn to listen")
        assert proc.poll() is None, log_path.read_text()
        # Each request waits a little at the LLM, so that both sync workers get some.
        server.delay_next(0.2, times=requests)

        def get(i: int) -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/request-{i}", timeout=30) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer

        with ThreadPoolExecutor(requests) as pool:
            answers = list(pool.map(get, range(requests)))
        assert len({a["pid"] for a in answers}) == 2, answers
        assert proc.pid not in {a["pid"] for a in answers}

        proc.send_signal(signal.SIGTERM)  # graceful stop: workers exit, then the master
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        stop_process(proc, 5.0)
    landed_by_master = len(_runs(mlflow_env.client(), persona_name))

    # Whatever the master did not land at exit, a replay does; nothing lands twice.
    replay = replay_cli(mlflow_env.tracking_uri, spool, env=env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"{requests - landed_by_master} traces landed, 0 records left" in replay.stdout
    assert_each_call_landed_once(mlflow_env.client(), persona_name, requests)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


APP_FORK = """
    import json, os, sys, time
    import openai
    import genai_mlflow

    uri, spool_dir, base_url, persona = sys.argv[1:5]
    handle = genai_mlflow.instrument(uri, spool_dir=spool_dir)


    def calls(tag, n):
        with openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0) as client:
            with genai_mlflow.persona(persona):
                for i in range(n):
                    client.chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"{tag} {i}"}]
                    )


    calls("parent before the fork", 2)
    pid = os.fork()
    if pid == 0:
        calls("child", 3)
        sys.exit(0)  # a normal exit: atexit shuts the child's pipeline down

    deadline = time.monotonic() + 30
    child_status = None
    while child_status is None and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            child_status = os.waitstatus_to_exitcode(status)
        else:
            time.sleep(0.05)
    if child_status is None:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    calls("parent after the fork", 2)
    print(json.dumps({"child": child_status, "flushed": handle.flush(60)}), flush=True)
    handle.shutdown()
"""


def test_os_fork_child_calls_land_once_through_the_parent(
    mlflow_env: MlflowStack, server: OpenAIServer, tmp_path: Path, persona_name: str
):
    script = write_script(tmp_path, "app_fork.py", APP_FORK)
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            mlflow_env.tracking_uri,
            str(tmp_path / "spool"),
            server.base_url,
            persona_name,
        ],
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"child": 0, "flushed": True}, done.stderr  # a child that hung: None
    assert_each_call_landed_once(mlflow_env.client(), persona_name, 2 + 3 + 2)


# --- 5. Wrong URI or credentials -----------------------------------------------------------------


def test_closed_port_calls_succeed_and_a_warning_says_mlflow_cannot_be_written(
    client: openai.OpenAI, spool_dir: Path, caplog: pytest.LogCaptureFixture
):
    uri = f"http://127.0.0.1:{free_port()}"
    caplog.set_level(logging.WARNING, logger="genai_mlflow")
    handle = genai_mlflow.instrument(uri, spool_dir=str(spool_dir))
    try:
        latencies = [timed_call(client, f"hello {i}") for i in range(3)]
        assert max(latencies) < FAST_CALL_S
        assert handle.flush(1) is False

        def warned() -> bool:
            return any(
                r.name.startswith("genai_mlflow.exporter")
                and r.levelno == logging.WARNING
                and "cannot write to MLflow" in r.getMessage()
                and uri in r.getMessage()
                for r in caplog.records
            )

        wait_until(warned, 15, "a warning that MLflow cannot be written")
    finally:
        handle.shutdown(timeout_s=1)


def _doctor_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_doctor_names_a_closed_port_and_says_what_to_do(tmp_path: Path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli("doctor", "--tracking-uri", uri, env=subprocess_env(tmp_path), timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1, result.stdout + result.stderr
    lines = _doctor_lines(result)
    [server_line] = [line for line in lines if line.startswith("FAIL server")]
    assert "cannot reach" in server_line
    assert uri in server_line
    fix = lines[lines.index(server_line) + 1].strip()
    assert fix.startswith("fix:")
    assert "start the MLflow server" in fix
    assert "MLFLOW_TRACKING_URI" in fix
    assert "Traceback" not in result.stdout + result.stderr


def test_doctor_against_the_real_stack_is_all_ok(mlflow_env: MlflowStack, tmp_path: Path):
    result = run_cli(
        "doctor", "--tracking-uri", mlflow_env.tracking_uri, env=subprocess_env(tmp_path), timeout=90
    )
    assert result.returncode == 0, result.stdout + result.stderr
    header, *checks = _doctor_lines(result)
    assert mlflow_env.tracking_uri in header
    assert len(checks) >= 6
    assert all(line.startswith("ok ") for line in checks), result.stdout
    names = {line.split()[1].rstrip(":") for line in checks}
    assert {"tracking", "server", "permissions", "artifact", "trace", "spool"} <= names


class _Unauthorised(BaseHTTPRequestHandler):
    """What an MLflow server with basic auth answers to a client without valid credentials."""

    def _deny(self) -> None:
        body = b'{"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}'
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _deny

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def auth_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorised)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_doctor_diagnoses_missing_credentials(auth_server: str, tmp_path: Path):
    result = run_cli("doctor", "--tracking-uri", auth_server, env=subprocess_env(tmp_path), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = _doctor_lines(result)
    [server_line] = [line for line in lines if line.startswith("FAIL server")]
    assert "401" in server_line
    assert "not authorised" in server_line
    fix = lines[lines.index(server_line) + 1].strip()
    assert fix.startswith("fix:")
    assert "MLFLOW_TRACKING_USERNAME" in fix
    assert "MLFLOW_TRACKING_PASSWORD" in fix
    assert "MLFLOW_TRACKING_TOKEN" in fix


def test_rejected_credentials_never_reach_the_app_and_are_logged(
    auth_server: str, client: openai.OpenAI, spool_dir: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="genai_mlflow")
    handle = genai_mlflow.instrument(auth_server, spool_dir=str(spool_dir))
    try:
        latencies = [timed_call(client, f"hello {i}") for i in range(2)]
        assert max(latencies) < FAST_CALL_S
        assert handle.flush(5) is False  # nothing landed: flush must not say it did

        def logged() -> bool:
            return any(
                r.name.startswith("genai_mlflow.exporter")
                and r.levelno >= logging.WARNING
                and "401" in r.getMessage()
                for r in caplog.records
            )

        wait_until(logged, 15, "an error saying MLflow refused the credentials")
    finally:
        handle.shutdown(timeout_s=1)
