"""Generated Secrets are made once and kept across upgrades (Helm's `lookup`), or come from
`existingSecret`. The upgrade is rendered against a fake Kubernetes API that holds the Secrets of
the first install, so `lookup` really finds them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.chart import CHART_DIR, FakeKubeAPI, Render, render, render_against

FULL: dict[str, Any] = {"mlflow": {"auth": {"enabled": True}}, "otelCollector": {"enabled": True}}
GENERATED = {
    "genai-mlflow-postgresql": {"password"},
    "genai-mlflow-minio": {"root-user", "root-password", "mlflow-access-key", "mlflow-secret-key"},
    "genai-mlflow-mlflow-auth": {"admin-password", "flask-secret-key"},
    "genai-mlflow-collector": {"token"},
}


def _secrets(rendered: Render) -> dict[str, dict[str, str]]:
    return {s["metadata"]["name"]: s["data"] for s in rendered.of_kind("Secret")}


def test_every_template_that_generates_a_secret_uses_lookup() -> None:
    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret" .ctx.Release.Namespace .name' in helpers
    for path in (CHART_DIR / "templates").rglob("*secret*.yaml"):
        text = path.read_text()
        assert "randAlphaNum" not in text, f"{path.name} generates without lookup"
        assert 'include "genai-mlflow.secretValue"' in text, path.name


def test_first_installs_generate_fresh_secrets() -> None:
    first, second = _secrets(render(FULL)), _secrets(render(FULL))
    assert {name: set(data) for name, data in first.items()} == GENERATED
    for name, keys in GENERATED.items():
        for key in keys:
            assert first[name][key] != second[name][key], f"{name}[{key}] must be random per install"


def test_an_upgrade_keeps_every_generated_secret() -> None:
    installed = render(FULL)
    with FakeKubeAPI() as api:
        for secret in installed.of_kind("Secret"):
            api.add(secret)
        upgraded = render_against(api, FULL)
        assert any(r.startswith("/api/v1/namespaces/genai/secrets/") for r in api.requests), (
            "lookup was not used"
        )
    assert _secrets(upgraded) == _secrets(installed)


def test_an_upgrade_adds_a_missing_key_and_keeps_the_others() -> None:
    installed = render(FULL)
    minio = installed.get("Secret", "genai-mlflow-minio")
    trimmed = {**minio, "data": {k: v for k, v in minio["data"].items() if k != "mlflow-secret-key"}}
    with FakeKubeAPI() as api:
        api.add(trimmed)
        upgraded = render_against(api, FULL).get("Secret", "genai-mlflow-minio")["data"]
    for key in ("root-user", "root-password", "mlflow-access-key"):
        assert upgraded[key] == minio["data"][key], key
    assert upgraded["mlflow-secret-key"]
    assert upgraded["mlflow-secret-key"] != minio["data"]["mlflow-secret-key"]


def test_a_secret_in_another_namespace_is_not_taken() -> None:
    installed = render(FULL)
    with FakeKubeAPI() as api:
        for secret in installed.of_kind("Secret"):
            api.add(secret, namespace="someone-else")
        upgraded = render_against(api, FULL)
    assert _secrets(upgraded)["genai-mlflow-postgresql"] != _secrets(installed)["genai-mlflow-postgresql"]


def test_generated_secrets_survive_uninstall_unless_told_otherwise() -> None:
    for secret in render(FULL).of_kind("Secret"):
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for secret in render({**FULL, "secrets": {"keepOnUninstall": False}}).of_kind("Secret"):
        assert "helm.sh/resource-policy" not in (secret["metadata"].get("annotations") or {})


@pytest.mark.parametrize(
    ("values", "gone", "used_name"),
    [
        ({"postgresql": {"auth": {"existingSecret": "my-pg"}}}, "genai-mlflow-postgresql", "my-pg"),
        ({"minio": {"auth": {"existingSecret": "my-minio"}}}, "genai-mlflow-minio", "my-minio"),
        ({"collector": {"auth": {"existingSecret": "my-token"}}}, "genai-mlflow-collector", "my-token"),
        (
            {"mlflow": {"auth": {"enabled": True, "existingSecret": "my-auth"}}},
            "genai-mlflow-mlflow-auth",
            "my-auth",
        ),
    ],
)
def test_an_existing_secret_replaces_the_generated_one(
    values: dict[str, Any], gone: str, used_name: str
) -> None:
    rendered = render(values)
    assert rendered.find("Secret", gone) is None
    referenced = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for w in rendered.workloads()
        for c in [
            *w["spec"]["template"]["spec"].get("initContainers", []),
            *w["spec"]["template"]["spec"]["containers"],
        ]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert used_name in referenced
    assert gone not in referenced
