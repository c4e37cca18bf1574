"""Render the chart with Helm's Go SDK (``helm-python-sdk``), no cluster and no ``helm`` binary.

``render(values)`` returns the manifests as dicts. ``FakeKubeAPI`` is a tiny Kubernetes API server on
127.0.0.1 that serves Secrets, enough for Helm's ``lookup``: rendering through it shows what an upgrade
renders when the release's Secrets already exist.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate.utils  # type: ignore[import-untyped]
import yaml  # type: ignore[import-untyped]

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "genai-mlflow"
RELEASE = "genai-mlflow"
NAMESPACE = "genai"
# kubernetes-validate re-reads and parses its schema files (a large definitions file included) on
# every call; parse each one once per session. The schemas are only read, never changed.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents
)

# Every manifest is validated against Kubernetes 1.33 and the newest version kubernetes-validate ships.
KUBE_VERSIONS = tuple(
    dict.fromkeys(("1.33", ".".join(kubernetes_validate.utils.latest_version().split(".")[:2])))
)

Manifest = dict[str, Any]


def load_values_file(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CHART_DIR / name).read_text())
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Render:
    """One rendered release: the manifests, and NOTES.txt."""

    manifests: list[Manifest]
    notes: str

    def of_kind(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] == kind]

    def get(self, kind: str, name: str) -> Manifest:
        for m in self.manifests:
            if m["kind"] == kind and m["metadata"]["name"] == name:
                return m
        raise KeyError(f"no {kind}/{name} in the render; have {sorted(self.names())}")

    def find(self, kind: str, name: str) -> Manifest | None:
        try:
            return self.get(kind, name)
        except KeyError:
            return None

    def names(self) -> set[str]:
        return {f"{m['kind']}/{m['metadata']['name']}" for m in self.manifests}

    def workloads(self) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def _parse(rendered: Mapping[str, str]) -> Render:
    manifests: list[Manifest] = []
    notes = ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                manifests.append(doc)
    return Render(manifests, notes)


def render(
    values: Mapping[str, Any] | None = None, *, namespace: str = NAMESPACE, release: str = RELEASE
) -> Render:
    """Render offline (``lookup`` finds nothing, as on a first install)."""
    with helm.Chart.load(CHART_DIR) as chart:
        out = chart.render(dict(values or {}), name=release, namespace=namespace, is_install=True)
    return _parse(out)


def render_against(
    api: FakeKubeAPI, values: Mapping[str, Any] | None = None, *, namespace: str = NAMESPACE
) -> Render:
    """Render as an upgrade against ``api``: ``lookup`` returns the objects it holds."""
    with (
        helm.Config(kube_apiserver=api.url, namespace=namespace) as config,
        helm.Chart.load(CHART_DIR) as chart,
    ):
        out = config.render(chart, dict(values or {}), name=RELEASE, namespace=namespace, is_upgrade=True)
    return _parse(out)


class FakeKubeAPI:
    """Just enough of the Kubernetes API for ``lookup "v1" "Secret" ns name``: discovery of ``v1``
    and GET of namespaced Secrets. Every request is recorded."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], Manifest] = {}
        self.requests: list[str] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append(self.path)
                status, body = api.answer(self.path.split("?", 1)[0])
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, manifest: Manifest, namespace: str = NAMESPACE) -> None:
        assert manifest["kind"] == "Secret"
        self.secrets[(namespace, manifest["metadata"]["name"])] = copy.deepcopy(manifest)

    def answer(self, path: str) -> tuple[int, Any]:
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        if path == "/apis":
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if path == "/api/v1":
            return 200, {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [
                    {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
                     "verbs": ["get", "list"]},
                ],
            }  # fmt: skip
        match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", path)
        if match and (match[1], match[2]) in self.secrets:
            secret = self.secrets[(match[1], match[2])]
            return 200, {**secret, "metadata": {**secret["metadata"], "namespace": match[1]}}
        return 404, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": "NotFound",
            "code": 404,
        }

    def __enter__(self) -> FakeKubeAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------
# Pods of a render


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Manifest, *, init: bool = True) -> Iterator[Manifest]:
    spec = pod_spec(workload)
    if init:
        yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(workload: Manifest, name: str) -> Manifest:
    for c in containers(workload):
        if c["name"] == name:
            return c
    raise KeyError(f"no container {name} in {workload['kind']}/{workload['metadata']['name']}")


def env_of(c: Manifest) -> dict[str, Any]:
    """Container env as name -> value, or name -> valueFrom dict."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels and matchExpressions); {} selects everything."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True
