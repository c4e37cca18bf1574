"""Wrong values are refused before anything is installed, with a message that names the value."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
import yaml  # type: ignore[import-untyped]

from tests.helm.chart import CHART_DIR, load_values_file, render

REJECTED: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "zero MLflow replicas",
        {"mlflow": {"replicas": 0}},
        ["/mlflow/replicas", "minimum"],
    ),
    (
        "a typo in a key",
        {"mlflow": {"replica": 2}},
        ["/mlflow", "'replica' not allowed"],
    ),
    (
        "an unknown top-level key",
        {"postgres": {"enabled": False}},
        ["'postgres' not allowed"],
    ),
    (
        "a boolean as a string",
        {"postgresql": {"enabled": "false"}},
        ["/postgresql/enabled", "want boolean"],
    ),
    (
        "an unquoted numeric tag",
        {"postgresql": {"image": {"tag": 17.5}}},
        ["/postgresql/image/tag", "want string"],
    ),
    (
        "a bad pull policy",
        {"collector": {"image": {"pullPolicy": "Sometimes"}}},
        ["/collector/image/pullPolicy"],
    ),
    (
        "a port out of range",
        {"collector": {"port": 70000}},
        ["/collector/port", "maximum"],
    ),
    (
        "an invalid bucket name",
        {"mlflow": {"artifacts": {"bucket": "My_Bucket"}}},
        ["/mlflow/artifacts/bucket"],
    ),
    (
        "an unknown sslmode",
        {"externalDatabase": {"sslmode": "maybe"}},
        ["/externalDatabase/sslmode", "verify-full"],
    ),
    (
        "a bad auth permission",
        {"mlflow": {"auth": {"defaultPermission": "ALL"}}},
        ["/mlflow/auth/defaultPermission"],
    ),
    (
        "a writable root filesystem",
        {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
        ["/containerSecurityContext/readOnlyRootFilesystem"],
    ),
    (
        "a tiny spool bound",
        {"collector": {"spool": {"maxBytes": 1000}}},
        ["/collector/spool/maxBytes", "minimum"],
    ),
    (
        "a volume size without a unit pattern",
        {"postgresql": {"persistence": {"size": "lots"}}},
        ["/postgresql/persistence/size"],
    ),
    (
        "a negative cost budget",
        {"metrics": {"prometheusRule": {"budgets": {"costUsdPerDay": -5}}}},
        ["/metrics/prometheusRule/budgets/costUsdPerDay"],
    ),
    (
        "a warning ratio above one",
        {"metrics": {"prometheusRule": {"warningRatio": 1.5}}},
        ["/metrics/prometheusRule/warningRatio", "maximum"],
    ),
    (
        "an allowed client that selects nothing",
        {"networkPolicy": {"allowedClients": [{}]}},
        ["/networkPolicy/allowedClients/0"],
    ),
    (
        "an allowed client with a typo",
        {"networkPolicy": {"allowedClients": [{"podSelecter": {}}]}},
        ["/networkPolicy/allowedClients/0", "'podSelecter' not allowed"],
    ),
    (
        "an ingress path without a slash",
        {
            "mlflow": {
                "ingress": {"hosts": [{"host": "a.example", "paths": [{"path": "ui", "pathType": "Prefix"}]}]}
            }
        },
        ["/mlflow/ingress/hosts/0/paths/0/path"],
    ),
    (
        "a non-URL S3 endpoint",
        {"externalS3": {"endpoint": "minio:9000"}},
        ["/externalS3/endpoint"],
    ),
    (
        "an HPA target above 100%",
        {"collector": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}},
        ["/collector/autoscaling/targetCPUUtilizationPercentage"],
    ),
]


@pytest.mark.parametrize(("case", "values", "fragments"), REJECTED, ids=[r[0] for r in REJECTED])
def test_schema_rejects_wrong_values_naming_them(
    case: str, values: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        render(values)
    message = str(info.value)
    assert "values don't meet the specifications of the schema" in message
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


CROSS_FIELD: list[tuple[str, dict[str, Any], str]] = [
    (
        "external DB without a host",
        {"postgresql": {"enabled": False}, "externalDatabase": {"existingSecret": "db"}},
        "postgresql.enabled=false needs externalDatabase.host",
    ),
    (
        "external DB without a secret",
        {"postgresql": {"enabled": False}, "externalDatabase": {"host": "db"}},
        "postgresql.enabled=false needs externalDatabase.existingSecret",
    ),
    (
        "external S3 without a bucket",
        {"minio": {"enabled": False}, "externalS3": {"existingSecret": "s3"}},
        "minio.enabled=false needs externalS3.bucket",
    ),
    (
        "external S3 without a secret",
        {"minio": {"enabled": False}, "externalS3": {"bucket": "b-1"}},
        "minio.enabled=false needs externalS3.existingSecret",
    ),
    (
        "an Ingress without TLS",
        {"mlflow": {"ingress": {"enabled": True, "tls": []}}},
        "needs mlflow.ingress.tls",
    ),
    (
        "HPA max below min",
        {"collector": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
        "maxReplicas must be >= collector.autoscaling.minReplicas",
    ),
    (
        "no time left to drain",
        {"collector": {"terminationGracePeriodSeconds": 10, "preStopSleepSeconds": 10}},
        "the spool gets no time to drain",
    ),
]


@pytest.mark.parametrize(("case", "values", "message"), CROSS_FIELD, ids=[c[0] for c in CROSS_FIELD])
def test_inconsistent_values_fail_with_a_clear_message(
    case: str, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as info:
        render(values)
    assert message in str(info.value), case


def test_shipped_values_files_pass_the_schema() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(load_values_file("values.yaml"))
        chart.validate_schema(load_values_file("values-local.yaml"))
        schema = chart.schema
    assert schema is not None
    # Every top-level key of values.yaml is described by the schema, and nothing else is allowed.
    assert schema["additionalProperties"] is False
    assert set(load_values_file("values.yaml")) == set(schema["properties"])


def test_no_password_in_plain_values() -> None:
    """Secrets are generated or come from existingSecret: values.yaml names keys, never secrets."""
    suspicious = ("password", "secret", "token", "key")

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, str) and any(word in path.lower().rsplit(".", 1)[-1] for word in suspicious):
            leaf = path.rsplit(".", 1)[-1]
            # Only Secret names and key names may appear.
            assert leaf.endswith(("Key", "existingSecret", "Secret")), f"{path} = {node!r}"

    for name in ("values.yaml", "values-local.yaml"):
        walk(yaml.safe_load((CHART_DIR / name).read_text()), name)
    text = (CHART_DIR / "values.yaml").read_text().lower()
    assert "password:" not in text.replace("passwordkey:", "")
