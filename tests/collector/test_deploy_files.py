"""The deployment files under ``collector/``: neither the upstream OpenTelemetry Collector nor a
container can run here, so their structure is checked: the pipeline's wiring, the Service names the
chart provides, and that the image installs the same dependency set the tests run on."""

from __future__ import annotations

import ast
import contextlib
import re
import shlex
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from genai_mlflow.collector.config import DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]
COLLECTOR_DIR = ROOT / "collector"
CHART = ROOT / "helm" / "genai-mlflow"
HEADLESS_SERVICE = "genai-mlflow-collector-headless"
CLUSTER_SERVICE = "genai-mlflow-collector"


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((COLLECTOR_DIR / name).read_text())
    assert isinstance(document, dict)
    return document


def _kind(component_id: str) -> str:
    """``file_storage/queue`` -> ``file_storage``: the collector's ``type[/name]`` ids."""
    return component_id.split("/", 1)[0]


def _check_wiring(config: dict[str, Any]) -> dict[str, Any]:
    """Every component a pipeline names is defined, every extension used is enabled, and the
    traces pipeline starts with memory_limiter. Returns the traces pipeline."""
    service = config["service"]
    pipeline: dict[str, Any] = service["pipelines"]["traces"]
    for section in ("receivers", "processors", "exporters"):
        for name in pipeline[section]:
            assert name in (config.get(section) or {}), f"{section[:-1]} {name} is used but not defined"
    for name in service.get("extensions", []):
        assert name in config["extensions"], f"extension {name} is enabled but not defined"
    assert pipeline["processors"][0] == "memory_limiter", "memory_limiter must come first"
    return pipeline


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1].strip("/"))


# --- the gateway ----------------------------------------------------------------------------------


def test_gateway_pipeline_is_receiver_memory_limiter_batch_loadbalancing():
    config = _load("otel-collector.yaml")
    pipeline = _check_wiring(config)
    assert pipeline["receivers"] == ["otlp"]
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert pipeline["processors"] == ["memory_limiter", "batch"]
    assert pipeline["exporters"] == ["loadbalancing"]


def test_gateway_routes_by_trace_id_to_the_headless_service_with_a_persistent_queue():
    config = _load("otel-collector.yaml")
    exporter = config["exporters"]["loadbalancing"]
    assert exporter["routing_key"] == "traceID"
    dns = exporter["resolver"]["dns"]
    assert dns["hostname"].split(".")[0] == HEADLESS_SERVICE
    assert dns["hostname"].endswith(".svc.cluster.local")
    assert set(exporter["protocol"]) == {"otlp"}  # the only protocol the exporter has: OTLP/gRPC
    bridge_port = _port(_load("otel-bridge.yaml")["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    assert int(dns["port"]) == bridge_port
    queue = exporter["sending_queue"]
    assert queue["enabled"] is True
    storage = queue["storage"]
    assert _kind(storage) == "file_storage"
    assert storage in config["service"]["extensions"]
    assert config["extensions"][storage]["directory"]
    assert exporter["retry_on_failure"]["max_elapsed_time"] == 0  # retried until delivered
    assert exporter["protocol"]["otlp"]["sending_queue"]["enabled"] is False  # one queue, the durable one


def test_batches_stay_under_the_collector_body_limit():
    from genai_mlflow.collector.config import DEFAULT_MAX_BODY_BYTES

    batch = _load("otel-collector.yaml")["processors"]["batch"]
    assert batch["send_batch_max_size"] * 4096 < DEFAULT_MAX_BODY_BYTES  # 4 KiB a span is generous


# --- the bridge in each collector pod -------------------------------------------------------------


def test_bridge_forwards_grpc_to_the_collector_in_its_pod_without_holding_anything():
    config = _load("otel-bridge.yaml")
    pipeline = _check_wiring(config)
    (exporter_name,) = pipeline["exporters"]
    assert _kind(exporter_name) == "otlphttp"
    exporter = config["exporters"][exporter_name]
    assert exporter["endpoint"] == f"http://127.0.0.1:{DEFAULT_PORT}"
    assert exporter["sending_queue"]["enabled"] is False
    assert exporter["retry_on_failure"]["enabled"] is False
    assert "GENAI_MLFLOW_COLLECTOR_TOKEN" in exporter["headers"]["Authorization"]


# --- the chart's Services, where the chart exists ---------------------------------------------------


@pytest.mark.skipif(not (CHART / "templates").is_dir(), reason="the chart is not in this tree")
def test_the_chart_defines_the_services_the_gateway_names():
    files = [p for p in (CHART / "templates").rglob("*") if p.suffix in (".yaml", ".tpl")]
    templates = "\n".join(p.read_text(errors="replace") for p in files)
    assert "collector-headless" in templates, f"no {HEADLESS_SERVICE} Service in the chart"
    assert re.search(r"clusterIP:\s*None", templates), "the headless Service needs clusterIP: None"


# --- the container ----------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = (COLLECTOR_DIR / "Dockerfile").read_text()
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            out.append((instruction.upper(), arguments.strip()))
    return out


def _pip_installs(command: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a shell command."""
    installs = []
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if (words[i] == "pip" and words[i + 1] == "install") or words[i : i + 3] == [
                "-m",
                "pip",
                "install",
            ]:
                start = i + 2 if words[i] == "pip" else i + 3
                installs.append(words[start:])
                break
    return installs


def _makefile_install() -> list[str]:
    """The arguments of the Makefile's ``pip install`` of the project (the tests' environment)."""
    for line in (ROOT / "Makefile").read_text().splitlines():
        for args in _pip_installs(line.replace("$(BIN)/python", "python")):
            if any(a.lstrip("-e").strip("'\"").startswith(".") for a in args if not a.startswith("--")):
                return args
    raise AssertionError("the Makefile installs no project")


def _options(args: list[str], names: tuple[str, ...]) -> list[str]:
    values = []
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
    return values


def test_dockerfile_runs_the_collector_as_non_root_on_4318():
    instructions = _dockerfile()
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", str(DEFAULT_PORT)) in instructions
    entrypoints = [args for kind, args in instructions if kind == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["genai-mlflow", "collector"]


def test_dockerfile_installs_the_dependency_set_the_tests_use():
    instructions = _dockerfile()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # The same Python as the tests, within what the package declares.
    (base,) = [args for kind, args in instructions if kind == "FROM"]
    version = re.match(r"python:(\d+)\.(\d+)", base)
    assert version, base
    assert (int(version.group(1)), int(version.group(2))) == sys.version_info[:2]
    assert pyproject["project"]["requires-python"] == f">={version.group(1)}.{version.group(2)}"
    # The project itself from its pyproject.toml: copied, then installed.
    copies = " ".join(args for kind, args in instructions if kind == "COPY")
    assert "pyproject.toml" in copies and "src" in copies
    installs = [words for kind, command in instructions if kind == "RUN" for words in _pip_installs(command)]
    project = [words for words in installs if any(a.startswith(".") for a in words)]
    assert len(project) == 1, installs
    (args,) = project
    (target,) = [a for a in args if a.startswith(".")]
    extras = set(re.findall(r"\[(.*)\]", target)[0].split(",")) if "[" in target else set()
    assert extras <= set(pyproject["project"].get("optional-dependencies", {})), extras
    # Nothing else is installed (no second list of requirements to drift from pyproject.toml) ...
    for other in installs:
        if other is not args:
            assert [a for a in other if not a.startswith("-")] == ["pip"], other
    # ... and the same constraints as the Makefile, with which the tests' environment is made.
    constraint_flags = ("-c", "--constraint", "-r", "--requirement")
    assert sorted(_options(args, constraint_flags)) == sorted(_options(_makefile_install(), constraint_flags))


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _closure(requirements: list[str]) -> set[str]:
    """Distributions that installing these requirements brings in (from installed metadata)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):
            todo.extend(Requirement(r) for r in metadata.requires(requirement.name) or [])
    return seen


def test_what_the_collector_imports_comes_with_the_base_dependencies():
    """``pip install .`` without extras suffices: every third-party module the collector's code
    path imports (collector, exporter, setup, config, cli) is in the base dependencies' closure."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    closure = _closure(pyproject["project"]["dependencies"])
    package = ROOT / "src" / "genai_mlflow"
    files = [*package.glob("collector/*.py"), *package.glob("exporter/*.py")]
    files += [package / name for name in ("setup.py", "config.py", "cli.py", "semconv.py", "context.py")]
    providers = metadata.packages_distributions()
    missing = {}
    for module in set().union(*(_top_level_imports(f) for f in files)):
        if module in sys.stdlib_module_names or module == "genai_mlflow":
            continue
        distributions = {canonicalize_name(d) for d in providers.get(module, [])}
        if not distributions & closure:
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not in the base dependencies: {missing}"
