"""Renders of the chart shared by the chart tests: each scenario is rendered once per session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.chart import Render, deep_merge, load_values_file, render

EXTERNAL_DB_SECRET = "team-db-credentials"
EXTERNAL_S3_SECRET = "team-s3-credentials"

SCENARIOS: dict[str, dict[str, Any]] = {
    # The chart's defaults.
    "default": {},
    # values-local.yaml, as the README installs it on k3d/kind.
    "local": load_values_file("values-local.yaml"),
    # Everything optional switched on.
    "full": {
        "mlflow": {
            "auth": {"enabled": True},
            "ingress": {"enabled": True, "className": "nginx"},
        },
        "collector": {"persistence": {"enabled": True}},
        "otelCollector": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "networkPolicy": {
            "allowedClients": [
                {"podSelector": {"matchLabels": {"genai-mlflow/client": "true"}}},
                {
                    "namespaceSelector": {"matchLabels": {"team": "data"}},
                    "podSelector": {"matchLabels": {"app": "notebook"}},
                },
            ]
        },
    },
    # PostgreSQL and S3 run elsewhere.
    "external": {
        "postgresql": {"enabled": False},
        "externalDatabase": {
            "host": "db.example.internal",
            "port": 6432,
            "database": "mlflow_prod",
            "username": "mlflow_app",
            "existingSecret": EXTERNAL_DB_SECRET,
            "existingSecretPasswordKey": "pg-password",
            "sslmode": "verify-full",
        },
        "minio": {"enabled": False},
        "externalS3": {
            "endpoint": "https://s3.eu-west-1.amazonaws.com",
            "region": "eu-west-1",
            "bucket": "team-mlflow-artifacts",
            "existingSecret": EXTERNAL_S3_SECRET,
        },
        "mlflow": {"auth": {"enabled": True, "existingSecret": "team-mlflow-auth"}},
        "collector": {"auth": {"existingSecret": "team-collector-token"}},
    },
}


@pytest.fixture(scope="session")
def renders() -> dict[str, Render]:
    return {name: render(values) for name, values in SCENARIOS.items()}


@pytest.fixture(scope="session", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest, renders: dict[str, Render]) -> tuple[str, Render]:
    name: str = request.param
    return name, renders[name]


def values_of(name: str) -> dict[str, Any]:
    """The full values of a scenario: the chart's defaults merged with the scenario's."""
    return deep_merge(load_values_file("values.yaml"), SCENARIOS[name])
