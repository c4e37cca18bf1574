"""App-side cost with the exporter live: the latency the app sees per ``chat.completions.create``.

Run by hand (not a test); needs PostgreSQL on 127.0.0.1:5432 (trust, user postgres)::

    .venv/bin/python benchmarks/bench_exporter_app_cost.py               # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/bench_exporter_app_cost.py --quick       # about 8 minutes
    .venv/bin/python benchmarks/bench_exporter_app_cost.py --colocated   # no CPU pinning
    .venv/bin/python benchmarks/bench_exporter_app_cost.py --only server-thread --only autolog-server

The real ``openai`` client calls the in-process ``OpenAIServer`` over loopback HTTP, one call at a time,
either paced at 20 calls/s (a call every 50 ms, on a fixed schedule) or back to back. Configurations:
genai-mlflow's exporter writing to the embedded store (a sqlite file in a temp dir) or to the server
stack of ``tests/mlflow_stack.py``, each with ``writer="thread"`` and ``writer="process"``; and, for
comparison, ``mlflow.openai.autolog()`` writing to each of the two.

Method: each configuration runs in a subprocess of its own (``instrument()`` and ``autolog()`` are
process-global), and alternates, in that subprocess, blocks of bare calls with blocks of instrumented
calls, order flipped every pair: genai-mlflow's instrumentor is taken off and put back between blocks
while its pipeline (spool and writer) stays live, and autolog is switched with ``autolog(disable=...)``.
Before every block the subprocess waits until what earlier blocks exported has landed (up to a bound),
so each block starts with an idle exporter and the bare blocks carry no leftover writer work.

Pinning (unless ``--colocated``): the app's subprocess runs on the first CPU, and the MLflow server, moto
and the writer process on the others. At 20 calls/s, landing in mode ``call`` needs more than one core
of MLflow server CPU, so on a two-core machine without pinning the app's latency mostly measures the
machine's saturation, not the exporter's cost to the app; with pinning the server stands in for one
on another machine. PostgreSQL (the machine's service) is pinned with them while the server stack runs,
and given back every CPU afterwards. Reported:
the median and the 99th percentile of the per-call latency over all bare and all instrumented calls,
their ratios, the median over pairs of the per-pair ratio of medians, and the app's CPU per call.
Goal: median <= 1.10x bare at 20 calls/s.
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench_exporter_common as common

GOAL_RATIO = 1.10
PACED_RATE = 20.0  # calls/s
RESULT_PREFIX = "RESULT "
DRAIN_WAIT_S = 180.0


@dataclass(frozen=True)
class Config:
    key: str
    name: str
    exporter: str  # "genai" or "autolog"
    destination: str  # "embedded" or "server"
    writer: str = "thread"


CONFIGS = [
    Config("embedded-thread", "genai-mlflow, embedded sqlite, writer thread", "genai", "embedded"),
    Config(
        "embedded-process", "genai-mlflow, embedded sqlite, writer process", "genai", "embedded", "process"
    ),
    Config("server-thread", "genai-mlflow, server stack, writer thread", "genai", "server"),
    Config("server-process", "genai-mlflow, server stack, writer proc.", "genai", "server", "process"),
    Config("autolog-embedded", "mlflow.openai.autolog(), embedded sqlite", "autolog", "embedded"),
    Config("autolog-server", "mlflow.openai.autolog(), server stack", "autolog", "server"),
]


@dataclass
class Sizes:
    paced_calls: int
    fast_calls: int
    pairs: int
    warmup: int


@dataclass
class PaceResult:
    """One pace of one configuration: latencies in µs, pooled over blocks, and per-pair ratios."""

    bare: list[float] = field(default_factory=list)
    instrumented: list[float] = field(default_factory=list)
    pair_ratios: list[float] = field(default_factory=list)
    bare_cpu_ms: list[float] = field(default_factory=list)  # app CPU per call, per block
    instrumented_cpu_ms: list[float] = field(default_factory=list)
    # App CPU per call from the start of an instrumented block until its calls have landed, plus the
    # writer process's CPU meanwhile: what exporting costs, wherever it runs.
    until_landed_cpu_ms: list[float] = field(default_factory=list)
    undrained: int = 0  # waits that hit DRAIN_WAIT_S

    def exporter_cpu_ms(self) -> float:
        return statistics.median(self.until_landed_cpu_ms) - statistics.median(self.bare_cpu_ms)


# ------------------------------------------------------------------------------------------------
# The child: one configuration


class Exporter(abc.ABC):
    """Switches one exporter on and off between blocks, and waits for what it exported to land."""

    @abc.abstractmethod
    def on(self) -> None: ...

    @abc.abstractmethod
    def off(self) -> None: ...

    @abc.abstractmethod
    def wait_landed(self, timeout_s: float) -> bool: ...

    def writer_pid(self) -> int | None:
        return None

    def close(self) -> None:
        self.off()


class GenaiExporter(Exporter):
    def __init__(self, tracking_uri: str, writer: str, spool_dir: Path) -> None:
        import genai_mlflow

        self._handle = genai_mlflow.instrument(tracking_uri, spool_dir=str(spool_dir), writer=writer)
        assert self._handle.pipeline is not None
        self._settings = self._handle.pipeline.settings
        self._instrumentor = genai_mlflow.OpenAIInstrumentor()

    def on(self) -> None:
        from opentelemetry import trace

        if not self._instrumentor.is_instrumented_by_opentelemetry:
            self._instrumentor.instrument(
                tracer_provider=trace.get_tracer_provider(),
                capture_content=True,
                max_value_bytes=self._settings.max_value_bytes,
            )

    def off(self) -> None:
        if self._instrumentor.is_instrumented_by_opentelemetry:
            self._instrumentor.uninstrument()

    def wait_landed(self, timeout_s: float) -> bool:
        return self._handle.flush(timeout_s)

    def writer_pid(self) -> int | None:
        pipeline = self._handle.pipeline
        process = pipeline.drain_process if pipeline is not None else None
        return process.pid if process is not None else None

    def close(self) -> None:
        self._handle.shutdown()


class AutologExporter(Exporter):
    def __init__(self, tracking_uri: str) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(common.new_persona("autolog"))
        self._enabled = False

    def on(self) -> None:
        if not self._enabled:
            self._mlflow.openai.autolog(silent=True)
            self._enabled = True

    def off(self) -> None:
        if self._enabled:
            self._mlflow.openai.autolog(disable=True, silent=True)
            self._enabled = False

    def wait_landed(self, timeout_s: float) -> bool:
        self._mlflow.flush_trace_async_logging()
        return True


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / (os.sysconf("SC_CLK_TCK"))


def run_block(client: Any, calls: int, paced: bool, offset: int) -> list[float]:
    """Latency of each call in µs; paced calls start on a fixed 50 ms schedule."""
    latencies = []
    interval = 1.0 / PACED_RATE
    started = time.perf_counter()
    for i in range(calls):
        if paced:
            delay = started + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        t0 = time.perf_counter_ns()
        common.chat(client, offset + i)
        latencies.append((time.perf_counter_ns() - t0) / 1000)
    return latencies


def measure_pace(exporter: Exporter, client: Any, calls: int, pairs: int, paced: bool) -> PaceResult:
    result = PaceResult()
    offset = 0
    for pair in range(pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        medians: dict[bool, float] = {}
        for instrumented in order:
            if not exporter.wait_landed(DRAIN_WAIT_S):
                result.undrained += 1
            (exporter.on if instrumented else exporter.off)()
            writer_pid = exporter.writer_pid()
            cpu0, writer0 = _cpu_s(None), _cpu_s(writer_pid) if writer_pid else 0.0
            latencies = run_block(client, calls, paced, offset)
            cpu_ms = (_cpu_s(None) - cpu0) * 1000 / calls
            offset += calls
            medians[instrumented] = statistics.median(latencies)
            if instrumented:
                result.instrumented += latencies
                result.instrumented_cpu_ms.append(cpu_ms)
                if not exporter.wait_landed(DRAIN_WAIT_S):
                    result.undrained += 1
                writer_s = _cpu_s(writer_pid) - writer0 if writer_pid else 0.0
                result.until_landed_cpu_ms.append((_cpu_s(None) - cpu0 + writer_s) * 1000 / calls)
            else:
                result.bare += latencies
                result.bare_cpu_ms.append(cpu_ms)
        result.pair_ratios.append(medians[True] / medians[False])
    exporter.off()
    return result


def child(
    config: Config, sizes: Sizes, tracking_uri: str, app_cpus: set[int], other_cpus: set[int]
) -> dict[str, Any]:
    from genai_mlflow.testing.openai_server import OpenAIServer

    common.quiet_logs()
    if app_cpus:
        os.sched_setaffinity(0, app_cpus)
    with tempfile.TemporaryDirectory(prefix="bench-app-cost-") as tmp, OpenAIServer() as server:
        client = common.make_client(server.base_url)
        if config.destination == "embedded":
            tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        exporter: Exporter
        if config.exporter == "genai":
            exporter = GenaiExporter(tracking_uri, config.writer, Path(tmp) / "spool")
            writer_pid = exporter.writer_pid()
            if writer_pid and other_cpus:  # it inherited the app's CPUs
                common.pin([writer_pid], other_cpus)
        else:
            exporter = AutologExporter(tracking_uri)
        try:
            # Warm-up: imports, pydantic models, the store's schema, the server's first requests.
            exporter.on()
            run_block(client, sizes.warmup, False, 0)
            exporter.wait_landed(DRAIN_WAIT_S)
            exporter.off()
            run_block(client, sizes.warmup, False, 0)
            results = {
                "paced": measure_pace(exporter, client, sizes.paced_calls, sizes.pairs, paced=True),
                "fast": measure_pace(exporter, client, sizes.fast_calls, sizes.pairs, paced=False),
            }
        finally:
            exporter.off()
            exporter.close()
    return {pace: asdict(result) for pace, result in results.items()}


# ------------------------------------------------------------------------------------------------
# The parent: the stack, the subprocesses, the report


def run_child(
    config: Config, sizes: Sizes, stack: common.MlflowStack | None, cpus: tuple[set[int], set[int]]
) -> dict[str, Any]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        config.key,
        "--tracking-uri",
        stack.tracking_uri if stack is not None else "",
        "--sizes",
        json.dumps(asdict(sizes)),
        "--cpus",
        json.dumps([sorted(cpus[0]), sorted(cpus[1])]),
    ]
    env = dict(os.environ)
    if stack is not None:
        env.update(stack.env)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            parsed: dict[str, Any] = json.loads(line.removeprefix(RESULT_PREFIX))
            return parsed
    tail = "\n".join((completed.stderr or completed.stdout).splitlines()[-15:])
    return {"error": f"exit {completed.returncode}: {tail}"}


def _us(value: float) -> str:
    return f"{value:,.0f}"


def report_rows(configs: list[Config], results: dict[str, dict[str, Any]]) -> list[list[str]]:
    header = ["configuration", "pace", "bare med µs", "bare p99", "instr med µs", "instr p99"]
    header += ["x med", "x p99", "x med/pair", "app cpu ms bare/instr", "export cpu ms", "goal"]
    rows = [header]
    for config in configs:
        data = results.get(config.key, {})
        if "error" in data:
            rows.append([config.name, "n/a", *(["-"] * (len(header) - 3)), "ERROR"])
            continue
        for pace, label in (("paced", f"{PACED_RATE:.0f}/s"), ("fast", "max")):
            result = PaceResult(**data[pace])
            bare_med = statistics.median(result.bare)
            instr_med = statistics.median(result.instrumented)
            bare_p99 = common.percentile(result.bare, 99)
            instr_p99 = common.percentile(result.instrumented, 99)
            ratio = instr_med / bare_med
            goal = "-"
            if pace == "paced" and config.exporter == "genai":
                goal = f"{'PASS' if ratio <= GOAL_RATIO else 'MISS'} (<= {GOAL_RATIO:.2f}x)"
            bare_cpu = statistics.median(result.bare_cpu_ms)
            cpu = f"{bare_cpu:.2f}/{statistics.median(result.instrumented_cpu_ms):.2f}"
            writer = f"{result.exporter_cpu_ms():.1f}"
            if result.undrained:
                goal += f" [{result.undrained} waits undrained]"
            rows.append(
                [
                    config.name,
                    label,
                    _us(bare_med),
                    _us(bare_p99),
                    _us(instr_med),
                    _us(instr_p99),
                    f"{ratio:.2f}",
                    f"{instr_p99 / bare_p99:.2f}",
                    f"{statistics.median(result.pair_ratios):.2f}",
                    cpu,
                    writer,
                    goal,
                ]
            )
    return rows


def split_cpus(colocated: bool) -> tuple[set[int], set[int]]:
    """(the app's CPUs, everyone else's): the first CPU for the app, the rest for MLflow's side.

    On this benchmark's usual machine the MLflow server, PostgreSQL and the app share two cores; at
    20 calls/s landing alone needs more than one of them, so without pinning the app's latency
    measures the machine's saturation rather than what the exporter costs the app."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if colocated or len(available) < 2:
        return set(), set()
    return {available[0]}, set(available[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller blocks")
    parser.add_argument("--pairs", type=int, help="bare/instrumented block pairs per pace")
    parser.add_argument(
        "--only", action="append", help="configuration key (repeatable): " + ", ".join(c.key for c in CONFIGS)
    )
    parser.add_argument(
        "--colocated",
        action="store_true",
        help="do not pin: the app, the writer process and the MLflow server share every CPU",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    by_key = {c.key: c for c in CONFIGS}
    if args.child:
        sizes = Sizes(**json.loads(args.sizes))
        app_cpus, other_cpus = (set(c) for c in json.loads(args.cpus))
        outcome = child(by_key[args.child], sizes, args.tracking_uri, app_cpus, other_cpus)
        print(RESULT_PREFIX + json.dumps(outcome), flush=True)
        return 0

    sizes = Sizes(
        paced_calls=40 if args.quick else 100,
        fast_calls=100 if args.quick else 200,
        pairs=args.pairs or (2 if args.quick else 3),
        warmup=30 if args.quick else 100,
    )
    cpus = split_cpus(args.colocated)
    configs = [by_key[key] for key in args.only] if args.only else CONFIGS
    common.quiet_logs()
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    needs_stack = any(c.destination == "server" for c in configs)
    with tempfile.TemporaryDirectory(prefix="bench-app-cost-") as tmp:
        stack_cm = common.running_stack(Path(tmp) / "stack") if needs_stack else None
        stack = stack_cm.__enter__() if stack_cm is not None else None
        pg_cm = common.postgres_pinned(cpus[1]) if stack is not None and cpus[1] else None
        if pg_cm is not None:
            pg_cm.__enter__()
        if stack is not None and cpus[1]:
            common.pin(common.stack_pids(stack), cpus[1])
        try:
            for config in configs:
                print(f"{config.key} ...", file=sys.stderr, flush=True)
                block_started = time.perf_counter()
                results[config.key] = run_child(
                    config, sizes, stack if config.destination == "server" else None, cpus
                )
                print(f"  {time.perf_counter() - block_started:.0f} s", file=sys.stderr, flush=True)
        finally:
            if pg_cm is not None:
                pg_cm.__exit__(None, None, None)
            if stack_cm is not None:
                stack_cm.__exit__(None, None, None)
    elapsed = time.perf_counter() - started
    print(
        f"App-side latency with the exporter live ({'quick' if args.quick else 'full'} run, "
        f"{elapsed:.0f} s in all)"
    )
    print(common.versions())
    print(common.load_note())
    print(
        f"app: real openai client -> in-process OpenAIServer (loopback HTTP), one thread; "
        f"{sizes.pairs} pairs of blocks per pace, {sizes.paced_calls} calls per paced block, "
        f"{sizes.fast_calls} per back-to-back block"
    )
    print("each configuration in its own subprocess, against bare blocks alternated in that subprocess;")
    if cpus[0]:
        print(
            f"pinned: the app (with a writer thread, and autolog's exporter) on CPU {sorted(cpus[0])}; "
            f"the writer process, MLflow server, moto and PostgreSQL on CPU {sorted(cpus[1])}"
        )
    else:
        print("not pinned: the app, the writer process and the MLflow server share every CPU")
    print(
        "x med/p99 = instrumented/bare over all calls; x med/pair = median over pairs of the ratio of medians"
    )
    print(
        "app cpu = this process's CPU per call during the blocks; export cpu = CPU per call from the\n"
        "  start of an instrumented block until its calls landed (app + writer process), less bare"
    )
    print(f"goal: genai-mlflow median <= {GOAL_RATIO:.2f}x bare at {PACED_RATE:.0f} calls/s")
    print()
    print(common.table(report_rows(configs, results)))
    for config in configs:
        error = results.get(config.key, {}).get("error")
        if error:
            print(f"\n{config.key}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
