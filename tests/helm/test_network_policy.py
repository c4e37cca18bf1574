"""Who may reach MLflow, PostgreSQL and MinIO, computed from the rendered NetworkPolicies.

Pods are the release's own (from its workloads) plus stand-ins for the rest of the cluster: an
ingress controller, client pods that `networkPolicy.allowedClients` selects, and pods that nothing
selects. A connection is allowed when no policy selects the target pod, or when some Ingress rule of
a policy that selects it admits the source on the target port (Kubernetes' semantics: policies are
additive; a rule's peers are ORed; podSelector alone means the policy's namespace; both selectors in
one peer are ANDed; a missing `from` or `ports` admits everything).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helm.chart import NAMESPACE, Manifest, Render, containers, pod_labels, selector_matches


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)


NAMESPACE_LABELS = {
    NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE},
    "ingress-nginx": {"kubernetes.io/metadata.name": "ingress-nginx"},
    "data": {"kubernetes.io/metadata.name": "data", "team": "data"},
    "other": {"kubernetes.io/metadata.name": "other"},
}

OUTSIDERS = [
    Pod("ingress-controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}),
    Pod("labelled-client", NAMESPACE, {"genai-mlflow/client": "true"}),
    Pod("notebook-in-data", "data", {"app": "notebook"}),
    Pod("notebook-elsewhere", "other", {"app": "notebook"}),
    Pod("random-same-namespace", NAMESPACE, {"app": "random"}),
    Pod("random-other-namespace", "other", {"app": "random"}),
    # Labelled like a client, but in another namespace: a bare podSelector does not reach it.
    Pod("labelled-client-elsewhere", "other", {"genai-mlflow/client": "true"}),
]


def release_pods(rendered: Render) -> dict[str, Pod]:
    pods = {}
    for w in rendered.workloads():
        ports = {p["name"]: p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
        component = pod_labels(w)["app.kubernetes.io/component"]
        pods[component] = Pod(component, NAMESPACE, pod_labels(w), ports)
    return pods


def _peer_admits(peer: dict[str, Any], source: Pod, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False  # pod traffic is judged by selectors here
    ns_selector = peer.get("namespaceSelector")
    pod_selector = peer.get("podSelector")
    if ns_selector is None:
        in_namespace = source.namespace == policy_ns
    else:
        in_namespace = selector_matches(ns_selector, NAMESPACE_LABELS[source.namespace])
    return in_namespace and (pod_selector is None or selector_matches(pod_selector, source.labels))


def _port_admits(rule: dict[str, Any], target: Pod, port_name: str) -> bool:
    if not rule.get("ports"):
        return True
    for port in rule["ports"]:
        if port.get("port") in (port_name, target.ports[port_name]) and port.get("protocol", "TCP") == "TCP":
            return True
    return False


def allowed(policies: list[Manifest], source: Pod, target: Pod, port_name: str) -> bool:
    selecting = [
        p
        for p in policies
        if target.namespace == NAMESPACE
        and selector_matches(p["spec"]["podSelector"], target.labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if (not peers or any(_peer_admits(peer, source, NAMESPACE) for peer in peers)) and _port_admits(
                rule, target, port_name
            ):
                return True
    return False


def reachers(rendered: Render, target_component: str, port_name: str) -> set[str]:
    pods = release_pods(rendered)
    target = pods[target_component]
    sources = [p for c, p in pods.items() if c != target_component] + OUTSIDERS
    policies = rendered.of_kind("NetworkPolicy")
    return {s.name for s in sources if allowed(policies, s, target, port_name)}


def test_mlflow_is_reached_by_the_collector_only_by_default(renders: dict[str, Render]) -> None:
    assert reachers(renders["default"], "mlflow", "http") == {"collector"}


def test_mlflow_is_reached_by_collector_ingress_controller_and_allowed_clients(
    renders: dict[str, Render],
) -> None:
    assert reachers(renders["full"], "mlflow", "http") == {
        "collector",
        "ingress-controller",
        "labelled-client",
        "notebook-in-data",
    }


def test_postgresql_is_reached_by_mlflow_and_its_migrations_only(renders: dict[str, Render]) -> None:
    for name in ("default", "full", "local"):
        assert reachers(renders[name], "postgresql", "postgresql") == {"mlflow"}, name
    # The migrations are the init container of those very MLflow pods.
    mlflow = renders["default"].get("Deployment", "genai-mlflow-mlflow")
    assert [c["name"] for c in mlflow["spec"]["template"]["spec"]["initContainers"]] == ["migrate"]


def test_minio_is_reached_by_mlflow_and_the_bucket_job_only(renders: dict[str, Render]) -> None:
    for name in ("default", "full", "local"):
        assert reachers(renders[name], "minio", "api") == {"mlflow", "minio-bucket"}, name


@pytest.mark.parametrize("component", ["collector", "otel-gateway"])
def test_otlp_receivers_stay_open_to_the_cluster(renders: dict[str, Render], component: str) -> None:
    port = "otlp-http"
    assert "random-other-namespace" in reachers(renders["full"], component, port)


def test_the_collectors_bridge_port_is_for_the_gateway_only(renders: dict[str, Render]) -> None:
    """The bridge forwards with the collector's token: nobody but the gateway may use it."""
    assert reachers(renders["full"], "collector", "otlp-grpc") == {"otel-gateway"}


def test_without_network_policies_everything_is_reachable() -> None:
    from tests.helm.chart import render

    rendered = render({"networkPolicy": {"enabled": False}})
    assert rendered.of_kind("NetworkPolicy") == []
    assert "random-other-namespace" in reachers(rendered, "postgresql", "postgresql")


def test_the_model_itself_denies_and_admits_as_kubernetes_does() -> None:
    """Guards the evaluator above against being vacuously permissive."""
    target = Pod("t", NAMESPACE, {"role": "db"}, {"pg": 5432})
    policy = {
        "spec": {
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"role": "app"}}}], "ports": [{"port": 5432}]}
            ],
        }
    }
    app = Pod("app", NAMESPACE, {"role": "app"})
    assert allowed([policy], app, target, "pg")
    assert not allowed([policy], Pod("app-elsewhere", "other", {"role": "app"}), target, "pg")
    assert not allowed([policy], Pod("x", NAMESPACE, {"role": "x"}), target, "pg")
    deny_all = {"spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not allowed([deny_all], app, target, "pg")
    assert allowed([deny_all, policy], app, target, "pg")
