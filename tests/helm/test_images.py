"""The chart's MLflow image is built from the repo with the project's MLflow range and the drivers
the chart needs, and runs as the user the chart expects."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.helm.chart import CHART_DIR, load_values_file

ROOT = CHART_DIR.parents[1]
DOCKERFILE = CHART_DIR / "images" / "mlflow" / "Dockerfile"


def _build_args(text: str) -> dict[str, str]:
    return dict(re.findall(r'^ARG (\w+)="([^"]*)"', text, flags=re.MULTILINE))


def test_mlflow_image_installs_the_projects_mlflow_range_with_auth_and_drivers() -> None:
    text = DOCKERFILE.read_text()
    args = _build_args(text)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mlflow_dep = next(
        Requirement(d) for d in project["project"]["dependencies"] if Requirement(d).name == "mlflow"
    )
    image_mlflow = Requirement(args["MLFLOW_SPEC"])
    assert image_mlflow.name == "mlflow"
    assert image_mlflow.specifier == mlflow_dep.specifier, (
        "keep the image's range in step with pyproject.toml"
    )
    assert "3.18.0" not in image_mlflow.specifier
    assert "auth" in image_mlflow.extras, "the basic-auth app needs mlflow[auth]"
    assert Requirement(args["PSYCOPG_SPEC"]).name == "psycopg"
    assert "binary" in Requirement(args["PSYCOPG_SPEC"]).extras
    assert Requirement(args["BOTO3_SPEC"]).name == "boto3"
    for name in ("MLFLOW_SPEC", "PSYCOPG_SPEC", "BOTO3_SPEC"):
        assert f"${{{name}}}" in text, f"{name} is declared but not installed"


def test_mlflow_image_runs_as_the_chart_user() -> None:
    text = DOCKERFILE.read_text()
    user = re.findall(r"^USER (\d+):(\d+)$", text, flags=re.MULTILINE)
    values = load_values_file("values.yaml")["mlflow"]["podSecurityContext"]
    assert user == [(str(values["runAsUser"]), str(values["runAsGroup"]))]
    assert re.search(r"^FROM python:3\.11-", text, flags=re.MULTILINE), "the project's Python"
    assert "HOME=/tmp" in text, "a read-only root filesystem leaves only /tmp writable"


def test_local_values_use_locally_built_images() -> None:
    local = load_values_file("values-local.yaml")
    for component in ("mlflow", "collector"):
        assert local[component]["image"]["pullPolicy"] == "Never", component
        assert local[component]["image"]["tag"] == "dev"
    readme = (ROOT / "README.md").read_text()
    assert "docker build -t genai-mlflow-server:dev" in readme
    assert "docker build -t genai-mlflow-collector:dev -f collector/Dockerfile" in readme


def test_the_helmignore_keeps_image_sources_out_of_the_chart_archive() -> None:
    ignored = (CHART_DIR / ".helmignore").read_text().split()
    assert "images/" in ignored
    assert Path(CHART_DIR / "images" / "mlflow" / "Dockerfile").is_file()
