"""Shared by the exporter benchmarks (``bench_landing``, ``bench_exporter_app_cost``, ``bench_burst``).

Not a benchmark itself. It holds the pieces the three scripts need in the same shape: the real MLflow
stack of the tests (``tests/mlflow_stack.py``) with its client environment applied, the request the app
makes, CPU and memory accounting from ``/proc``, counts of what landed (read from PostgreSQL, so that
checking costs the MLflow server nothing), per-request timings of the writer's MLflow calls, and the
table printer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # for tests.mlflow_stack, when run as ``python benchmarks/<script>.py``
    sys.path.insert(0, str(REPO))

import openai  # noqa: E402
import psycopg  # noqa: E402
from tests.mlflow_stack import MlflowStack, mlflow_stack  # noqa: E402

__all__ = ["DEFAULT_WORKERS", "MlflowStack", "mlflow_stack"]

from genai_mlflow.exporter import records  # noqa: E402
from genai_mlflow.stack import DEFAULT_WORKERS  # noqa: E402

MODEL = "gpt-4o-mini"
_SYSTEM = (
    "You are a support assistant for an online bookshop. Answer in at most three short paragraphs, "
    "cite the order number when the customer gives one, and hand over to a human agent when asked."
)


def quiet_logs() -> None:
    """MLflow, urllib3 and alembic chatter off; genai-mlflow's own warnings stay visible."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("genai_mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------------
# The stack and the app's request


@contextlib.contextmanager
def running_stack(tmp_dir: Path, workers: int = DEFAULT_WORKERS) -> Iterator[MlflowStack]:
    """``tests.mlflow_stack.mlflow_stack`` with its client environment in ``os.environ`` meanwhile,
    its server with the local stack's workers (the tests run two)."""
    with mlflow_stack(tmp_dir, workers=workers) as stack:
        saved = {key: os.environ.get(key) for key in stack.env}
        os.environ.update(stack.env)
        try:
            yield stack
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def make_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="bench-key", max_retries=0)


def chat(client: openai.OpenAI, i: int) -> Any:
    """One realistic non-streamed chat call: a system prompt and a question, two request params."""
    return client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Order 48213-B, question {i}: where is my second book?"},
        ],
        temperature=0.2,
        max_tokens=200,
    )


def new_persona(label: str) -> str:
    return f"bench_{label}_{uuid.uuid4().hex[:8]}"


def experiment_of(persona: str) -> str:
    """The experiment genai-mlflow puts a persona's calls of today (UTC) in."""
    return records.experiment_name(persona, datetime.now(UTC).date())


# ------------------------------------------------------------------------------------------------
# What landed, read from the stack's PostgreSQL database


@dataclass
class Landed:
    runs: int = 0
    finished_runs: int = 0
    traces: int = 0
    linked_traces: int = 0  # traces with a TRACE -> RUN association
    latency_steps: int = 0  # latency_ms metric rows (one per call in mode window)

    def complete_call_mode(self, calls: int) -> bool:
        return self.runs == self.finished_runs == self.traces == self.linked_traces == calls

    def complete_window_mode(self, calls: int) -> bool:
        return self.traces == self.linked_traces == self.latency_steps == calls and self.runs >= 1

    def summary(self) -> str:
        return (
            f"runs {self.runs} (finished {self.finished_runs}), traces {self.traces} "
            f"(linked {self.linked_traces}), latency_ms steps {self.latency_steps}"
        )


def landed(db_url: str, experiment_name: str) -> Landed:
    """Counts for one experiment, straight from MLflow's tables (no load on the MLflow server)."""
    query = """
        WITH e AS (SELECT experiment_id FROM experiments WHERE name = %(name)s),
             r AS (SELECT run_uuid, status FROM runs WHERE experiment_id IN (SELECT experiment_id FROM e)),
             t AS (SELECT request_id FROM trace_info WHERE experiment_id IN (SELECT experiment_id FROM e))
        SELECT
            (SELECT count(*) FROM r),
            (SELECT count(*) FROM r WHERE status = 'FINISHED'),
            (SELECT count(*) FROM t),
            (SELECT count(DISTINCT a.source_id) FROM entity_associations a
              WHERE a.source_type = 'trace' AND a.destination_type = 'run'
                AND a.source_id IN (SELECT request_id FROM t)),
            (SELECT count(*) FROM metrics m WHERE m.key = 'latency_ms'
                AND m.run_uuid IN (SELECT run_uuid FROM r))
    """
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(query, {"name": experiment_name}).fetchone()
    assert row is not None
    return Landed(*(int(value) for value in row))


# ------------------------------------------------------------------------------------------------
# CPU and memory, from /proc (Linux); zero elsewhere

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class _Proc:
    pid: int
    pgid: int
    name: str
    cpu_s: float
    title: str  # the command line, or the title a postgres backend sets (it names the database)


def _procs() -> list[_Proc]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            close = stat.rindex(")")
            fields = stat[close + 2 :].split()
            cpu = (int(fields[11]) + int(fields[12])) / _TICK
            found.append(_Proc(int(entry), int(fields[2]), stat[stat.index("(") + 1 : close], cpu, title))
    return found


class CpuMeter:
    """CPU seconds used by groups of processes between ``start()`` and ``stop()``.

    Groups: ``app`` (this process), ``writer`` (extra pids, e.g. a writer process), ``mlflow`` (the
    server's process group), ``postgres`` (the backends serving the stack's database, found by the
    title PostgreSQL gives them; shared work such as the WAL writer is not counted) and ``moto``. A
    process that ends in between is not counted.
    """

    def __init__(self, stack: MlflowStack | None, extra_pids: Callable[[], list[int]] | None = None) -> None:
        self._stack = stack
        self._dbname = stack.db_url.rsplit("/", 1)[-1] if stack is not None else None
        self._extra: Callable[[], list[int]] = extra_pids or list
        self._start: dict[int, tuple[str, float]] = {}
        self.used: dict[str, float] = {}

    def _group(self, proc: _Proc, server_pgid: int | None, extra: set[int]) -> str | None:
        if proc.pid == os.getpid():
            return "app"
        if proc.pid in extra:
            return "writer"
        if server_pgid is not None and proc.pgid == server_pgid:
            return "mlflow"
        if proc.name.startswith("postgres") and self._dbname and f" {self._dbname} " in proc.title:
            return "postgres"
        if (
            proc.name.startswith("moto")
            and self._stack is not None
            and self._stack.s3_endpoint.rsplit(":", 1)[-1] in proc.title
        ):
            return "moto"
        return None

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        proc = self._stack._proc if self._stack is not None else None
        server_pgid = proc.pid if proc is not None else None
        extra = set(self._extra())
        out = {}
        for p in _procs():
            group = self._group(p, server_pgid, extra)
            if group is not None:
                out[p.pid] = (group, p.cpu_s)
        return out

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        used: dict[str, float] = {}
        for pid, (group, cpu) in end.items():
            before = self._start.get(pid, (group, 0.0))[1]
            used[group] = used.get(group, 0.0) + max(0.0, cpu - before)
        self.used = used
        return used


def stack_pids(stack: MlflowStack) -> list[int]:
    """The MLflow server's processes (its process group) and moto's."""
    proc = stack._proc
    moto_port = stack.s3_endpoint.rsplit(":", 1)[-1]
    return [
        p.pid
        for p in _procs()
        if (proc is not None and p.pgid == proc.pid) or (p.name.startswith("moto") and moto_port in p.title)
    ]


def pin(pids: list[int], cpus: set[int]) -> None:
    """Restrict processes (all their threads) to ``cpus``; quietly skips a process that is gone."""
    for pid in pids:
        for task in _tasks(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(task, cpus)


@contextlib.contextmanager
def postgres_pinned(cpus: set[int]) -> Iterator[None]:
    """PostgreSQL (the machine's service: its postmaster, so new backends inherit it, and every
    backend) on ``cpus`` for the ``with`` body, then back to the CPUs each had. Skipped quietly
    where it is not allowed (not root, another user's server)."""
    saved: dict[int, set[int]] = {}
    for proc in _procs():
        if not proc.name.startswith("postgres"):
            continue
        for task in _tasks(proc.pid):
            with contextlib.suppress(OSError):
                before = os.sched_getaffinity(task)
                os.sched_setaffinity(task, cpus)
                saved[task] = before
    try:
        yield
    finally:
        for proc in _procs():  # backends forked meanwhile inherited the pin: give them every CPU
            if proc.name.startswith("postgres"):
                for task in _tasks(proc.pid):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(task, saved.get(task, set(range(os.cpu_count() or 1))))


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def peak_rss_mb(pid: int | None = None) -> float | None:
    """Peak resident set size (VmHWM) of a process, in MiB; this process when ``pid`` is None."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------
# Per-request timings of the writer's MLflow calls


class RequestTimings:
    """Wraps the methods of a gateway class (and the spool's read) to time each call.

    Installed on the class, so it sees every request of every writer in this process; ``remove()``
    puts the originals back. Used to say where the writer's time goes, never to compute throughput.
    """

    GATEWAY_METHODS = ("experiment_id", "create_run", "post_traces", "log_batch", "end_run", "find_run")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: dict[str, list[float]] = {}
        self._spans: dict[str, list[tuple[float, float]]] = {}  # (start, end) of each call
        self._restore: list[tuple[type, str, Any]] = []

    def install(self, klass: type, methods: tuple[str, ...], prefix: str = "") -> None:
        for name in methods:
            original = klass.__dict__[name]
            self._restore.append((klass, name, original))
            setattr(klass, name, self._timed(original, prefix + name))

    def _timed(self, original: Callable[..., Any], label: str) -> Callable[..., Any]:
        samples = self.samples
        spans = self._spans

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                with self._lock:
                    samples.setdefault(label, []).append(end - start)
                    spans.setdefault(label, []).append((start, end))

        return timed

    def reset(self) -> None:
        with self._lock:
            self.samples.clear()
            self._spans.clear()

    def most_at_once(self, label: str) -> int:
        """The most calls of ``label`` in flight at the same time."""
        with self._lock:
            edges = sorted(
                edge for start, end in self._spans.get(label, []) for edge in ((start, 1), (end, -1))
            )
        most = now = 0
        for _, step in edges:  # at a tie, an end (-1) sorts before a start: touching is not overlapping
            now += step
            most = max(most, now)
        return most

    def remove(self) -> None:
        for klass, name, original in reversed(self._restore):
            setattr(klass, name, original)
        self._restore.clear()

    def busy_s(self, labels: tuple[str, ...]) -> float:
        with self._lock:
            return sum(sum(self.samples.get(label, [])) for label in labels)

    def rows(self, labels: tuple[str, ...]) -> list[list[str]]:
        rows = []
        with self._lock:
            for label in labels:
                values = self.samples.get(label)
                if not values:
                    continue
                rows.append(
                    [
                        label,
                        str(len(values)),
                        f"{statistics.median(values) * 1000:.1f}",
                        f"{percentile(values, 90) * 1000:.1f}",
                        f"{sum(values):.1f}",
                    ]
                )
        return rows


# ------------------------------------------------------------------------------------------------
# Output


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation): a value that was measured."""
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def table(rows: list[list[str]]) -> str:
    """First column left-aligned, the others right-aligned; a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def source_digest() -> str:
    """A digest of genai-mlflow's sources as run: the working tree may differ from any commit."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src" / "genai_mlflow").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"genai-mlflow sources {source_digest()}"]
    for dist in ("mlflow", "openai", "opentelemetry-sdk"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{dist} {metadata.version(dist)}")
    parts.append(f"{os.cpu_count()} cpus")
    return ", ".join(parts)


def load_note() -> str:
    """Other work on the machine skews every figure here: say how busy it was."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average: unknown"
    return f"load average now: {one:.2f} (1 min), {five:.2f} (5 min)"


def stack_description(stack: MlflowStack) -> str:
    return (
        f"MLflow server {stack.tracking_uri} (uvicorn, {stack.workers} workers) on PostgreSQL "
        "127.0.0.1:5432, artifacts on moto S3; all on this machine"
    )
