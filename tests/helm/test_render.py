"""The chart renders, lints, and every manifest is valid Kubernetes (offline, with Helm's Go SDK)."""

from __future__ import annotations

import helm_python as helm
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.helm.chart import CHART_DIR, KUBE_VERSIONS, NAMESPACE, RELEASE, Manifest, Render
from tests.helm.conftest import SCENARIOS

# kubernetes-validate knows the built-in kinds only; the Prometheus Operator's two are checked against
# the fields the operator requires.
_CRD_SCHEMAS: dict[str, Manifest] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr"],
                                        "properties": {
                                            "alert": {
                                                "type": "string",
                                                "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                                            },
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": {"type": "string", "pattern": "^[0-9]+(s|m|h)$"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                        "additionalProperties": False,
                                    },
                                }
                            },
                        },
                    }
                },
            },
        },
    },
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_lint_finds_no_warning_or_error(name: str) -> None:
    report = helm.lint(CHART_DIR, SCENARIOS[name], strict=True, namespace=NAMESPACE, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems
    assert report["errors"] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes(scenario: tuple[str, Render], kube_version: str) -> None:
    name, rendered = scenario
    assert rendered.manifests, name
    for manifest in rendered.manifests:
        what = f"{name}: {manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in _CRD_SCHEMAS:
            jsonschema.validate(manifest, _CRD_SCHEMAS[manifest["kind"]])
            continue
        try:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{what} is invalid for Kubernetes {kube_version}: {exc.message} at {list(exc.path)}")


def test_names_are_unique_per_kind(scenario: tuple[str, Render]) -> None:
    _, rendered = scenario
    keys = [(m["kind"], m["metadata"]["name"]) for m in rendered.manifests]
    assert len(keys) == len(set(keys))


def test_every_object_is_labelled_for_the_release(scenario: tuple[str, Render]) -> None:
    _, rendered = scenario
    for m in rendered.manifests:
        labels = m["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, m["metadata"]["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", m["metadata"]["name"]
        assert "namespace" not in m["metadata"], "namespaced by the release, not hard-coded"


def test_default_render_has_the_whole_stack(renders: dict[str, Render]) -> None:
    names = renders["default"].names()
    for expected in (
        "Deployment/genai-mlflow-mlflow",
        "Service/genai-mlflow-mlflow",
        "StatefulSet/genai-mlflow-postgresql",
        "Service/genai-mlflow-postgresql",
        "StatefulSet/genai-mlflow-minio",
        "Service/genai-mlflow-minio",
        "Job/genai-mlflow-minio-bucket",
        "Deployment/genai-mlflow-collector",
        "Service/genai-mlflow-collector",
        "Service/genai-mlflow-collector-headless",
        "HorizontalPodAutoscaler/genai-mlflow-collector",
        "PodDisruptionBudget/genai-mlflow-collector",
        "NetworkPolicy/genai-mlflow-mlflow",
        "NetworkPolicy/genai-mlflow-postgresql",
        "NetworkPolicy/genai-mlflow-minio",
        "NetworkPolicy/genai-mlflow-collector",
        "ConfigMap/genai-mlflow-grafana-dashboard",
    ):
        assert expected in names, expected
    # Optional parts stay off by default.
    for absent in ("Ingress", "ServiceMonitor", "PrometheusRule"):
        assert not renders["default"].of_kind(absent), absent
    assert renders["default"].find("Deployment", "genai-mlflow-otel-gateway") is None


def test_collector_services_have_the_agreed_names_and_ports(scenario: tuple[str, Render]) -> None:
    _, rendered = scenario
    svc = rendered.get("Service", "genai-mlflow-collector")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"].get("clusterIP") != "None"
    assert {"name": "otlp-http", "port": 4318, "targetPort": "otlp-http", "protocol": "TCP"} in svc["spec"][
        "ports"
    ]
    headless = rendered.get("Service", "genai-mlflow-collector-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert any(p["name"] == "otlp-http" and p["port"] == 4318 for p in headless["spec"]["ports"])
    assert headless["spec"]["selector"] == svc["spec"]["selector"]


def test_release_name_and_namespace_flow_into_names() -> None:
    from tests.helm.chart import render

    other = render({}, release="obs", namespace="platform")
    assert other.find("Service", "obs-genai-mlflow-collector") is not None
    collector = other.get("Deployment", "obs-genai-mlflow-collector")
    env = {e["name"]: e.get("value") for e in collector["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://obs-genai-mlflow-mlflow:5000"
    assert "platform" in other.notes
