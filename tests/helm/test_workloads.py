"""What a reviewer checks in the rendered workloads: probes, hardening, selectors, references,
migration ordering and hooks, the collector's spool, and the external database/S3 switches."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.helm.chart import (
    CHART_DIR,
    NAMESPACE,
    Manifest,
    Render,
    container,
    containers,
    env_of,
    pod_labels,
    pod_spec,
    render,
    selector_matches,
)
from tests.helm.conftest import EXTERNAL_DB_SECRET, EXTERNAL_S3_SECRET, values_of

LONG_RUNNING = ("Deployment", "StatefulSet")
ROOT_SRC = CHART_DIR.parents[1] / "src"


def _long_running(rendered: Render) -> Iterator[Manifest]:
    for w in rendered.workloads():
        if w["kind"] in LONG_RUNNING:
            yield w


# ------------------------------------------------------------------------------- probes


def test_every_long_running_container_has_probes(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    for w in _long_running(rendered):
        for c in containers(w, init=False):
            where = f"{name}: {w['metadata']['name']}/{c['name']}"
            assert "readinessProbe" in c, where
            assert "livenessProbe" in c, where


def test_mlflow_and_collector_probe_their_health_endpoints(scenario: tuple[str, Render]) -> None:
    _, rendered = scenario
    mlflow = container(rendered.get("Deployment", "genai-mlflow-mlflow"), "mlflow")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert mlflow[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    collector_kind = "StatefulSet" if rendered.find("StatefulSet", "genai-mlflow-collector") else "Deployment"
    collector = container(rendered.get(collector_kind, "genai-mlflow-collector"), "collector")
    assert collector["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert collector["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert collector["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert collector["readinessProbe"]["httpGet"]["port"] == "otlp-http"


# ------------------------------------------------------------------------------- hardening


def test_pods_run_non_root_without_a_service_account_token(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    for w in rendered.workloads():
        spec = pod_spec(w)
        where = f"{name}: {w['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] > 0, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True, where


def test_every_container_is_read_only_unprivileged_and_has_resources(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    for w in rendered.workloads():
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        for c in containers(w):
            where = f"{name}: {w['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), where
            assert "memory" in res["limits"], where
            # Every mount is a volume of the pod (or a claim template); writable ones are emptyDirs
            # or persistent volumes, never the image.
            claim_templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claim_templates, (where, mount)


def test_python_and_server_containers_get_a_writable_tmp(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    needs_tmp = {"migrate", "mlflow", "postgresql", "minio", "collector", "mc"}
    for w in rendered.workloads():
        volumes = {v["name"]: v for v in pod_spec(w).get("volumes", [])}
        for c in containers(w):
            if c["name"] not in needs_tmp:
                continue
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp, f"{name}: {c['name']} has no /tmp"
            assert "emptyDir" in volumes[tmp[0]["name"]], c["name"]


def test_images_are_the_official_ones_and_pinned(scenario: tuple[str, Render]) -> None:
    _, rendered = scenario
    for w in rendered.workloads():
        for c in containers(w):
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), image
    images = {c["name"]: c["image"] for w in rendered.workloads() for c in containers(w)}
    if "postgresql" in images:
        assert images["postgresql"].startswith("postgres:")
    if "minio" in images:
        assert images["minio"].startswith("minio/minio:RELEASE.")
        assert images["mc"].startswith("minio/mc:RELEASE.")
    assert images["migrate"] == images["mlflow"], "migrations run with the server's own MLflow version"


# ------------------------------------------------------------------------------- selectors


def test_workload_selectors_match_their_pod_labels(scenario: tuple[str, Render]) -> None:
    _, rendered = scenario
    for w in _long_running(rendered):
        assert selector_matches(w["spec"]["selector"], pod_labels(w)), w["metadata"]["name"]


def test_services_select_pods_and_target_named_ports(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    for svc in rendered.of_kind("Service"):
        selected = [
            w
            for w in _long_running(rendered)
            if selector_matches({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))
        ]
        assert len(selected) == 1, (
            f"{name}: Service {svc['metadata']['name']} selects {len(selected)} workloads"
        )
        port_names = {p["name"] for c in containers(selected[0], init=False) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, (svc["metadata"]["name"], port)


def test_pdbs_hpa_and_statefulsets_point_at_what_exists(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        matched = [
            w for w in _long_running(rendered) if selector_matches(pdb["spec"]["selector"], pod_labels(w))
        ]
        assert len(matched) == 1, (name, pdb["metadata"]["name"])
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = rendered.get(ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for sts in rendered.of_kind("StatefulSet"):
        governing = rendered.get("Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"
    for policy in rendered.of_kind("NetworkPolicy"):
        matched = [
            w
            for w in _long_running(rendered)
            if selector_matches(policy["spec"]["podSelector"], pod_labels(w))
        ]
        assert len(matched) == 1, (name, policy["metadata"]["name"])


# ------------------------------------------------------------------------------- references


def _references(w: Manifest) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key) of every Secret and ConfigMap a pod uses."""
    for c in containers(w):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                yield "Secret", src["secretRef"]["name"], None
            if "configMapRef" in src:
                yield "ConfigMap", src["configMapRef"]["name"], None
    for v in pod_spec(w).get("volumes", []):
        if "secret" in v:
            yield "Secret", v["secret"]["secretName"], None
        if "configMap" in v:
            yield "ConfigMap", v["configMap"]["name"], None


def _existing_secrets(values: dict[str, Any]) -> set[str]:
    candidates = [
        values["postgresql"]["auth"]["existingSecret"],
        values["externalDatabase"]["existingSecret"],
        values["minio"]["auth"]["existingSecret"],
        values["externalS3"]["existingSecret"],
        values["mlflow"]["auth"]["existingSecret"],
        values["collector"]["auth"]["existingSecret"],
    ]
    return {c for c in candidates if c}


def test_every_referenced_secret_and_configmap_exists(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    external = _existing_secrets(values_of(name))
    for w in rendered.workloads():
        for kind, ref, key in _references(w):
            where = f"{name}: {w['metadata']['name']} -> {kind}/{ref}[{key}]"
            obj = rendered.find(kind, ref)
            if obj is None:
                assert kind == "Secret" and ref in external, (
                    f"{where} is neither rendered nor an existingSecret"
                )
                continue
            if key is not None:
                assert key in (obj.get("data") or {}), where


def test_ingress_routes_to_the_mlflow_service_over_tls(renders: dict[str, Render]) -> None:
    ingress = renders["full"].get("Ingress", "genai-mlflow-mlflow")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "mlflow-tls", "hosts": ["mlflow.example.com"]}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    svc = renders["full"].get("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}


# ------------------------------------------------------------------------------- MLflow and migrations


def test_migrations_run_in_an_init_container_before_the_server(scenario: tuple[str, Render]) -> None:
    _, rendered = scenario
    deployment = rendered.get("Deployment", "genai-mlflow-mlflow")
    spec = pod_spec(deployment)
    assert [c["name"] for c in spec["initContainers"]] == ["migrate"]
    migrate, serve = spec["initContainers"][0], container(deployment, "mlflow")
    assert migrate["command"][-1] == "migrate"
    assert serve["command"][-1] == "serve"
    assert migrate["command"][1] == serve["command"][1] == "/opt/genai-mlflow/mlflow-entrypoint.py"
    # The same database, credentials included, for both.
    for key in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD", "DB_SSLMODE"):
        assert env_of(migrate)[key] == env_of(serve)[key], key
    # No hook: migrations happen wherever MLflow pods start (install, upgrade, rollback, restart),
    # and a pre-install hook could not reach a database that does not exist yet.
    assert "helm.sh/hook" not in (deployment["metadata"].get("annotations") or {})
    for m in rendered.manifests:
        hooks = (m["metadata"].get("annotations") or {}).get("helm.sh/hook", "")
        assert "pre-install" not in hooks, m["metadata"]["name"]


def test_the_entrypoint_script_is_shipped_verbatim_and_rolls_pods_when_changed(
    renders: dict[str, Render],
) -> None:
    source = (CHART_DIR / "files" / "mlflow-entrypoint.py").read_text()
    cm = renders["default"].get("ConfigMap", "genai-mlflow-mlflow-scripts")
    assert cm["data"]["mlflow-entrypoint.py"] == source.rstrip("\n")
    annotations = renders["default"].get("Deployment", "genai-mlflow-mlflow")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["checksum/scripts"] == hashlib.sha256(source.encode()).hexdigest()


def test_mlflow_server_settings(renders: dict[str, Render]) -> None:
    deployment = renders["default"].get("Deployment", "genai-mlflow-mlflow")
    env = env_of(container(deployment, "mlflow"))
    assert env["MLFLOW_MODEL_CATALOG_URI"] == ""
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://genai-mlflow-minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {
        "name": "genai-mlflow-minio",
        "key": "mlflow-access-key",
    }
    assert env["DB_PASSWORD"]["secretKeyRef"] == {"name": "genai-mlflow-postgresql", "key": "password"}
    assert env["AUTH_ENABLED"] == "false"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_mlflow_accepts_the_host_names_its_clients_use(scenario: tuple[str, Render]) -> None:
    """MLflow's DNS-rebinding guard rejects unknown Host headers: the collector's URI, the Service's
    in-cluster names, localhost (port-forward) and the Ingress hosts must all be allowed."""
    import fnmatch
    from urllib.parse import urlsplit

    name, rendered = scenario
    allowed = env_of(container(rendered.get("Deployment", "genai-mlflow-mlflow"), "mlflow"))[
        "MLFLOW_ALLOWED_HOSTS"
    ]
    patterns = allowed.split(",")

    def ok(host: str) -> bool:
        return any(fnmatch.fnmatch(host, p) if "*" in p else host == p for p in patterns)

    kind = "StatefulSet" if rendered.find("StatefulSet", "genai-mlflow-collector") else "Deployment"
    tracking_uri = env_of(container(rendered.get(kind, "genai-mlflow-collector"), "collector"))[
        "MLFLOW_TRACKING_URI"
    ]
    assert ok(urlsplit(tracking_uri).netloc), (name, tracking_uri)
    for host in (
        "genai-mlflow-mlflow",
        f"genai-mlflow-mlflow.{NAMESPACE}.svc:5000",
        f"genai-mlflow-mlflow.{NAMESPACE}.svc.cluster.local:5000",
        "localhost:5000",
        "127.0.0.1:5000",
    ):
        assert ok(host), host
    assert not ok("evil.example.com")
    if name == "full":
        assert ok("mlflow.example.com")


def test_basic_auth_has_its_own_database_and_the_collector_uses_it(renders: dict[str, Render]) -> None:
    rendered = renders["full"]
    deployment = rendered.get("Deployment", "genai-mlflow-mlflow")
    migrate = env_of(container(deployment, "migrate"))
    serve = env_of(container(deployment, "mlflow"))
    assert migrate["AUTH_ENABLED"] == serve["AUTH_ENABLED"] == "true"
    assert migrate["AUTH_DB_NAME"] == "mlflow_auth" != migrate["DB_NAME"]
    assert serve["MLFLOW_AUTH_ADMIN_PASSWORD"]["secretKeyRef"]["name"] == "genai-mlflow-mlflow-auth"
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in serve
    collector = env_of(container(rendered.get("StatefulSet", "genai-mlflow-collector"), "collector"))
    assert collector["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert collector["MLFLOW_TRACKING_PASSWORD"] == serve["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_bucket_job_is_an_idempotent_post_install_and_upgrade_hook(renders: dict[str, Render]) -> None:
    job = renders["default"].get("Job", "genai-mlflow-minio-bucket")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    c = container(job, "mc")
    script = c["args"][0]
    assert "mc mb --ignore-existing" in script
    assert env_of(c)["BUCKET"] == "mlflow"
    assert env_of(c)["MINIO_URL"] == "http://genai-mlflow-minio:9000"
    assert job["spec"]["backoffLimit"] >= 1


# ------------------------------------------------------------------------------- collector


def _collector(rendered: Render) -> Manifest:
    return rendered.find("StatefulSet", "genai-mlflow-collector") or rendered.get(
        "Deployment", "genai-mlflow-collector"
    )


def test_collector_runs_the_agreed_command_and_environment(scenario: tuple[str, Render]) -> None:
    name, rendered = scenario
    values = values_of(name)
    c = container(_collector(rendered), "collector")
    assert c["command"] == ["genai-mlflow", "collector", "--port", "4318"]
    assert c["image"].startswith(values["collector"]["image"]["repository"] + ":")
    env = env_of(c)
    assert env["MLFLOW_TRACKING_URI"] == "http://genai-mlflow-mlflow:5000"
    assert env["GENAI_MLFLOW_SPOOL_DIR"] == "/var/lib/genai-mlflow/spool"
    assert int(env["GENAI_MLFLOW_SPOOL_MAX_BYTES"]) == values["collector"]["spool"]["maxBytes"]
    if values["collector"]["auth"]["enabled"]:
        ref = env["GENAI_MLFLOW_COLLECTOR_TOKEN"]["secretKeyRef"]
        assert ref["name"] == (values["collector"]["auth"]["existingSecret"] or "genai-mlflow-collector")
    else:
        assert "GENAI_MLFLOW_COLLECTOR_TOKEN" not in env
    assert any(m["mountPath"] == "/var/lib/genai-mlflow/spool" for m in c["volumeMounts"])


def test_collector_spool_drains_on_termination(renders: dict[str, Render]) -> None:
    """Default: a Deployment whose spool is an emptyDir, drained on SIGTERM within the grace period."""
    deployment = renders["default"].get("Deployment", "genai-mlflow-collector")
    spec = pod_spec(deployment)
    c = container(deployment, "collector")
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + 30, (
        "the drain needs time after the preStop sleep"
    )
    spool = next(v for v in spec["volumes"] if v["name"] == "spool")
    assert spool["emptyDir"]["sizeLimit"] == "2Gi"
    hpa = renders["default"].get("HorizontalPodAutoscaler", "genai-mlflow-collector")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "genai-mlflow-collector",
    }
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    assert scale_down["stabilizationWindowSeconds"] >= 60
    pdb = renders["default"].get("PodDisruptionBudget", "genai-mlflow-collector")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_collector_with_persistence_keeps_a_spool_volume_per_pod(renders: dict[str, Render]) -> None:
    sts = renders["full"].get("StatefulSet", "genai-mlflow-collector")
    assert renders["full"].find("Deployment", "genai-mlflow-collector") is None
    assert sts["spec"]["serviceName"] == "genai-mlflow-collector-headless"
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["spool"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenScaled": "Retain",
        "whenDeleted": "Retain",
    }
    assert not any(v["name"] == "spool" for v in pod_spec(sts)["volumes"])
    assert "preStop" in container(sts, "collector")["lifecycle"], "draining still applies"
    hpa = renders["full"].get("HorizontalPodAutoscaler", "genai-mlflow-collector")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"


# ------------------------------------------------------------------------------- OpenTelemetry gateway


def test_gateway_routes_by_trace_id_to_each_collector_pods_bridge(renders: dict[str, Render]) -> None:
    rendered = renders["full"]
    config = yaml.safe_load(rendered.get("ConfigMap", "genai-mlflow-otel-gateway")["data"]["config.yaml"])
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline == {
        "receivers": ["otlp"],
        "processors": ["memory_limiter", "batch"],
        "exporters": ["loadbalancing"],
    }
    for section in ("receivers", "processors", "exporters"):
        for component in pipeline[section]:
            assert component in config[section], component
    for ext in config["service"]["extensions"]:
        assert ext in config["extensions"], ext
    lb = config["exporters"]["loadbalancing"]
    assert lb["routing_key"] == "traceID"
    assert lb["sending_queue"]["storage"] in config["service"]["extensions"]
    assert lb["sending_queue"]["storage"].startswith("file_storage")
    dns = lb["resolver"]["dns"]
    assert dns["hostname"] == f"genai-mlflow-collector-headless.{NAMESPACE}.svc.cluster.local"
    headless = rendered.get("Service", "genai-mlflow-collector-headless")
    grpc = next(p for p in headless["spec"]["ports"] if p["name"] == "otlp-grpc")
    assert int(dns["port"]) == grpc["port"]
    # Each collector pod answers OTLP/gRPC on that port through its bridge, which forwards to the
    # collector on localhost with the token, and holds nothing itself.
    sts = rendered.get("StatefulSet", "genai-mlflow-collector")
    bridge = container(sts, "grpc-bridge")
    assert any(p["name"] == "otlp-grpc" and p["containerPort"] == grpc["port"] for p in bridge["ports"])
    bridge_config = yaml.safe_load(
        rendered.get("ConfigMap", "genai-mlflow-collector-grpc-bridge")["data"]["config.yaml"]
    )
    exporter = bridge_config["exporters"]["otlphttp/genai-mlflow"]
    assert exporter["endpoint"] == "http://127.0.0.1:4318"
    assert "GENAI_MLFLOW_COLLECTOR_TOKEN" in exporter["headers"]["Authorization"]
    assert exporter["sending_queue"] == {"enabled": False}
    assert exporter["retry_on_failure"] == {"enabled": False}
    assert (
        bridge["lifecycle"]["preStop"]["sleep"]["seconds"]
        < container(sts, "collector")["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    # The bridge adds the token, not the gateway; the gateway's queue directory is a mounted volume.
    gateway = rendered.get("Deployment", "genai-mlflow-otel-gateway")
    assert "headers" not in lb["protocol"]["otlp"]
    mounts = {m["mountPath"] for m in container(gateway, "otel-gateway")["volumeMounts"]}
    assert config["extensions"][lb["sending_queue"]["storage"]]["directory"] in mounts


def test_no_bridge_without_the_gateway(renders: dict[str, Render]) -> None:
    deployment = renders["default"].get("Deployment", "genai-mlflow-collector")
    assert [c["name"] for c in containers(deployment)] == ["collector"]
    headless = renders["default"].get("Service", "genai-mlflow-collector-headless")
    assert [p["name"] for p in headless["spec"]["ports"]] == ["otlp-http"]


# ------------------------------------------------------------------------------- external services


def test_external_database_and_s3_remove_the_statefulsets(renders: dict[str, Render]) -> None:
    rendered = renders["external"]
    assert rendered.of_kind("StatefulSet") == []
    assert rendered.of_kind("Job") == []
    for gone in ("genai-mlflow-postgresql", "genai-mlflow-minio"):
        for kind in ("Service", "Secret", "NetworkPolicy"):
            assert rendered.find(kind, gone) is None, (kind, gone)
    assert rendered.of_kind("PersistentVolumeClaim") == []
    env = env_of(container(rendered.get("Deployment", "genai-mlflow-mlflow"), "migrate"))
    assert env["DB_HOST"] == "db.example.internal"
    assert env["DB_PORT"] == "6432"
    assert env["DB_NAME"] == "mlflow_prod"
    assert env["DB_USER"] == "mlflow_app"
    assert env["DB_SSLMODE"] == "verify-full"
    assert env["DB_PASSWORD"]["secretKeyRef"] == {"name": EXTERNAL_DB_SECRET, "key": "pg-password"}
    serve = env_of(container(rendered.get("Deployment", "genai-mlflow-mlflow"), "mlflow"))
    assert serve["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://team-mlflow-artifacts/artifacts"
    assert serve["MLFLOW_S3_ENDPOINT_URL"] == "https://s3.eu-west-1.amazonaws.com"
    assert serve["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert serve["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {"name": EXTERNAL_S3_SECRET, "key": "access-key-id"}
    # Every Secret comes from the user: the chart generates none.
    assert rendered.of_kind("Secret") == []


def test_aws_s3_needs_no_endpoint() -> None:
    values = {"minio": {"enabled": False}, "externalS3": {"bucket": "b-1", "existingSecret": "s3"}}
    env = env_of(container(render(values).get("Deployment", "genai-mlflow-mlflow"), "mlflow"))
    assert "MLFLOW_S3_ENDPOINT_URL" not in env


# ------------------------------------------------------------------------------- monitoring and notes

_AGREED_METRICS = {
    "genai_tokens_total",
    "genai_cost_usd_total",
    "genai_call_duration_seconds_bucket",
    "genai_call_duration_seconds_count",
    "genai_call_duration_seconds_sum",
}


def _exprs(panels: list[dict[str, Any]]) -> Iterator[str]:
    for panel in panels:
        yield from (t["expr"] for t in panel.get("targets", []))
        yield from _exprs(panel.get("panels", []))


def test_grafana_dashboard_shows_tokens_cost_and_latency_per_persona_and_model(
    renders: dict[str, Render],
) -> None:
    import re

    cm = renders["default"].get("ConfigMap", "genai-mlflow-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["genai-mlflow.json"])
    exprs = list(_exprs(dashboard["panels"]))
    used = {m for e in exprs for m in re.findall(r"\bgenai_[a-z_]+", e)}
    assert used <= _AGREED_METRICS, used - _AGREED_METRICS
    assert {"genai_tokens_total", "genai_cost_usd_total", "genai_call_duration_seconds_bucket"} <= used
    joined = "\n".join(exprs)
    assert "by (persona)" in joined and "by (model)" in joined and "histogram_quantile" in joined
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"persona", "model", "datasource"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_rule_alerts_on_the_budgets_in_values() -> None:
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "warningRatio": 0.5,
                "budgets": {
                    "tokensPerHour": 1000,
                    "tokensPerDay": 20000,
                    "costUsdPerHour": 2.5,
                    "costUsdPerDay": 30,
                    "personaCostUsdPerDay": 7,
                },
            }
        }
    }
    rule = render(values).get("PrometheusRule", "genai-mlflow")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts["GenAITokensHourlyBudget"]["expr"] == "sum(increase(genai_tokens_total[1h])) > 1000"
    assert alerts["GenAITokensHourlyBudgetWarning"]["expr"] == "sum(increase(genai_tokens_total[1h])) > 500"
    assert alerts["GenAICostHourlyBudget"]["expr"] == "sum(increase(genai_cost_usd_total[1h])) > 2.5"
    assert alerts["GenAICostHourlyBudgetWarning"]["expr"] == "sum(increase(genai_cost_usd_total[1h])) > 1.25"
    assert alerts["GenAICostDailyBudget"]["expr"] == "sum(increase(genai_cost_usd_total[1d])) > 30"
    assert alerts["GenAITokensDailyBudget"]["expr"].endswith("> 20000")
    persona = alerts["GenAIPersonaCostDailyBudget"]
    assert persona["expr"] == "sum by (persona) (increase(genai_cost_usd_total[1d])) > 7"
    assert "{{ $labels.persona }}" in persona["annotations"]["summary"]
    assert alerts["GenAICostDailyBudget"]["labels"]["severity"] == "critical"
    assert alerts["GenAICostDailyBudgetWarning"]["labels"]["severity"] == "warning"
    assert "GenAICollectorDown" in alerts


def test_service_monitor_scrapes_each_collector_pod_once(renders: dict[str, Render]) -> None:
    rendered = renders["full"]
    sm = rendered.get("ServiceMonitor", "genai-mlflow-collector")
    selected = [
        s
        for s in rendered.of_kind("Service")
        if selector_matches(sm["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in selected] == ["genai-mlflow-collector-headless"]
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_notes_say_how_to_open_the_ui_and_where_to_send_otlp(renders: dict[str, Render]) -> None:
    notes = renders["default"].notes
    assert "port-forward svc/genai-mlflow-mlflow 5000:5000" in notes
    assert "http://genai-mlflow-collector.genai:4318/v1/traces" in notes
    assert "get secret genai-mlflow-collector" in notes
    full = renders["full"].notes
    assert "https://mlflow.example.com/" in full
    assert "genai-mlflow-otel-gateway" in full
    assert "get secret genai-mlflow-mlflow-auth" in full


def test_generated_secret_values_are_base64_of_long_random_strings(renders: dict[str, Render]) -> None:
    for secret in renders["full"].of_kind("Secret"):
        for key, value in secret["data"].items():
            decoded = base64.b64decode(value).decode()
            assert len(decoded) >= 20 and decoded.isalnum(), (secret["metadata"]["name"], key)


@pytest.mark.parametrize("component", ["postgresql", "minio"])
def test_data_volumes_are_claimed_per_statefulset(renders: dict[str, Render], component: str) -> None:
    sts = renders["default"].get("StatefulSet", f"genai-mlflow-{component}")
    template = sts["spec"]["volumeClaimTemplates"][0]
    assert template["metadata"]["name"] == "data"
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert sts["spec"]["replicas"] == 1


def test_collector_drains_within_the_grace_period_left_after_pre_stop(renders: dict[str, Render]) -> None:
    for name in ("default", "local"):
        w = renders[name].get("Deployment", "genai-mlflow-collector")
        c = container(w, "collector")
        grace = pod_spec(w)["terminationGracePeriodSeconds"]
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = float(env_of(c)["GENAI_MLFLOW_COLLECTOR_GRACE_S"])
        assert drain >= 10 and pre_stop + drain < grace, (name, pre_stop, drain, grace)


def test_alerts_and_dashboard_use_metrics_the_collector_exports(renders: dict[str, Render]) -> None:
    """Every metric the PrometheusRule and the dashboard query is one the collector's code names."""
    import re

    sources = ROOT_SRC / "genai_mlflow" / "collector"
    if not sources.is_dir():
        pytest.skip("no collector package in this checkout")
    code = "\n".join(p.read_text() for p in sources.rglob("*.py"))
    rule = render({"metrics": {"prometheusRule": {"enabled": True}}}).get("PrometheusRule", "genai-mlflow")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads(
        renders["default"].get("ConfigMap", "genai-mlflow-grafana-dashboard")["data"]["genai-mlflow.json"]
    )
    exprs += list(_exprs(dashboard["panels"]))
    used = {m for e in exprs for m in re.findall(r"\bgenai_[a-z_]+", e)}
    histogram_suffix = re.compile(r"_(bucket|count|sum)$")
    for metric in sorted(used):
        base = histogram_suffix.sub("", metric)
        assert f'"{metric}"' in code or f'"{base}"' in code, f"{metric} is not a metric of the collector"


def _shape(node: Any) -> Any:
    """The keys of a config, recursively, without the values."""
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items()}
    return type(node).__name__ if not isinstance(node, list) else "list"


@pytest.mark.parametrize(
    ("repo_file", "configmap"),
    [
        ("otel-collector.yaml", "genai-mlflow-otel-gateway"),
        ("otel-bridge.yaml", "genai-mlflow-collector-grpc-bridge"),
    ],
)
def test_rendered_gateway_configs_match_the_repos_collector_configs(
    renders: dict[str, Render], repo_file: str, configmap: str
) -> None:
    """The chart renders collector/'s configs from values: same components, same wiring, same
    settings where the chart has no value of its own."""
    path = CHART_DIR.parents[1] / "collector" / repo_file
    if not path.is_file():
        pytest.skip(f"no collector/{repo_file} in this checkout")
    repo = yaml.safe_load(path.read_text())
    rendered = yaml.safe_load(renders["full"].get("ConfigMap", configmap)["data"]["config.yaml"])
    assert rendered["service"]["pipelines"] == repo["service"]["pipelines"]
    assert rendered["service"]["extensions"] == repo["service"]["extensions"]
    for section in ("extensions", "receivers", "processors", "exporters"):
        assert set(rendered[section]) == set(repo[section]), section
    # The same structure throughout, key for key.
    for section in ("receivers", "processors", "exporters", "extensions"):
        assert _shape(rendered[section]) == _shape(repo[section]), section
    if repo_file == "otel-collector.yaml":
        lb, repo_lb = rendered["exporters"]["loadbalancing"], repo["exporters"]["loadbalancing"]
        assert lb["routing_key"] == repo_lb["routing_key"] == "traceID"
        assert lb["resolver"]["dns"]["port"] == repo_lb["resolver"]["dns"]["port"]
        assert lb["resolver"]["dns"]["hostname"] == repo_lb["resolver"]["dns"]["hostname"].replace(
            "${env:POD_NAMESPACE}", NAMESPACE
        )
        assert lb["protocol"] == repo_lb["protocol"]
        assert lb["retry_on_failure"] == repo_lb["retry_on_failure"]
        assert lb["sending_queue"]["storage"] == repo_lb["sending_queue"]["storage"]
    else:
        exporter = rendered["exporters"]["otlphttp/genai-mlflow"]
        repo_exporter = repo["exporters"]["otlphttp/genai-mlflow"]
        assert exporter == repo_exporter
        assert rendered["receivers"] == repo["receivers"]
