"""The MLflow calls the writer makes, and nothing else: one thin class per kind of tracking URI.

``RestGateway`` talks to an MLflow server with the fewest requests MLflow allows (raw REST and OTLP,
with the credentials MLflow's client would send, and no hidden retries: the writer retries, behind
its circuit breaker). ``StoreGateway`` writes to a local tracking store (the embedded
``sqlite:///mlflow.db``) through MLflow's store API, the same calls the server would make.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from genai_mlflow import semconv as sc

from .records import Offload, TraceTiming

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import MlflowHostCreds

OTLP_PATH = "/v1/traces"
_USER = (
    getpass.getuser() if hasattr(os, "getuid") else "genai-mlflow"
)  # the run's user, as MLflow's client sets it
REQUEST_TIMEOUT_S = 30
DEFAULT_CONNECTIONS = 10  # kept open per gateway until a writer asks for one per worker
# What MLflow says when a run is created in a soft-deleted experiment.
_DELETED_EXPERIMENT = "must be in the 'active' state"
_MISSING = "RESOURCE_DOES_NOT_EXIST"
# MLflow's prompt tags (mlflow/prompt/constants.py): every prompt version carries both.
_IS_PROMPT = "mlflow.prompt.is_prompt"
_PROMPT_TEXT = "mlflow.prompt.text"
_PROMPT_NAME = re.compile(r"^[a-zA-Z0-9_.-]+$")  # PROMPT_NAME_RULE
_PROMPT_EXPERIMENTS = "_mlflow_experiment_ids"  # ",0,1,": the experiments whose Prompts tab lists it
_MODEL_ID = "mlflow.modelId"  # the trace metadata that links a trace to a LoggedModel
_MODEL_TYPE = "genai_app"
_MODEL_NAME_CHARS = 100
_NEWEST_FIRST = [{"field_name": "creation_timestamp", "ascending": False}]


class GatewayError(RuntimeError):
    """An MLflow call failed. ``retryable`` is False for errors that a retry cannot fix."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Gateway(Protocol):
    tracking_uri: str

    def experiment_id(self, name: str, tags: dict[str, str]) -> str: ...
    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict[str, str]) -> str: ...
    def log_batch(
        self,
        run_id: str,
        params: dict[str, str],
        metrics: Sequence[tuple[str, float, int, int]],
        tags: dict[str, str],
    ) -> None: ...
    def end_run(self, run_id: str, status: str, end_ms: int) -> None: ...
    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None: ...
    def post_traces(
        self, experiment_id: str, run_id: str | None, request: ExportTraceServiceRequest
    ) -> None: ...
    def upload(self, run_id: str, offloads: Sequence[Offload]) -> None: ...
    def artifact_uri(self, run_id: str, path: str) -> str: ...
    def prompt_version_exists(self, name: str, version: str) -> bool: ...
    def link_prompts(self, trace_id: str, prompts: Sequence[tuple[str, str]]) -> None: ...
    def add_prompt_experiment(self, name: str, experiment_id: str) -> None: ...
    def logged_model_id(self, experiment_id: str, app_version: str) -> str: ...
    def link_trace_to_model(
        self, experiment_id: str, trace_id: str, timing: TraceTiming, model_id: str
    ) -> None: ...


def make_gateway(tracking_uri: str) -> Gateway:
    if tracking_uri.startswith(("http://", "https://")):
        return RestGateway(tracking_uri)
    return StoreGateway(tracking_uri)


class _ExperimentCache:
    """Experiment ids by name, each looked up once: the workers that meet a new name while its
    lookup runs wait for it, rather than each asking MLflow (every persona's experiment is new at
    midnight UTC). LoggedModel ids by experiment and app version too, so that a process creates
    one model per version, not one per worker that meets it first."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}
        self._lookups: dict[str, Future[str]] = {}
        self._lock = threading.Lock()

    def get(self, name: str, lookup: Callable[[], str]) -> str:
        known = self._ids.get(name)
        if known is not None:
            return known
        with self._lock:
            known = self._ids.get(name)
            if known is not None:
                return known
            future = self._lookups.get(name)
            leader = future is None
            if future is None:
                future = self._lookups[name] = Future()
        if not leader:
            return future.result()  # the lookup's error, if it fails, is each waiter's
        try:
            experiment_id = lookup()
        except BaseException as exc:
            with self._lock:
                del self._lookups[name]  # the next caller tries afresh
            future.set_exception(exc)
            raise
        with self._lock:
            self._ids[name] = experiment_id
            del self._lookups[name]
        future.set_result(experiment_id)
        return experiment_id


class _Client:
    """What MLflow's ``http_request`` sends, minus its per-request cost (it resolves the request
    header providers on every call, about 0.6 ms of CPU): one session with a connection per worker,
    headers resolved once, and the credentials applied here as MLflow applies them."""

    def __init__(self, creds: MlflowHostCreds, headers: dict[str, str]) -> None:
        import requests  # here, as mlflow is: importing genai_mlflow stays light

        self.session = requests.Session()
        self.headers = headers
        if creds.username and creds.password:
            basic = base64.standard_b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {basic}"
        elif creds.token:
            self.headers["Authorization"] = f"Bearer {creds.token}"
        # Per request, as MLflow passes them: a session's own ``verify`` loses to REQUESTS_CA_BUNDLE.
        self.options: dict[str, Any] = {
            "verify": (
                creds.server_cert_path
                if creds.server_cert_path is not None
                else not creds.ignore_tls_verification
            ),
            "timeout": REQUEST_TIMEOUT_S,
            "allow_redirects": os.environ.get("MLFLOW_ALLOW_HTTP_REDIRECTS", "true").lower() in ("true", "1"),
        }
        if creds.client_cert_path is not None:
            self.options["cert"] = creds.client_cert_path
        self.connections = 0
        self.reserve(DEFAULT_CONNECTIONS)

    def reserve(self, connections: int) -> None:
        if connections <= self.connections:
            return
        from requests.adapters import HTTPAdapter

        # No retries here: the writer retries, behind its circuit breaker.
        adapter = HTTPAdapter(pool_maxsize=connections, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.connections = connections

    @staticmethod
    def for_creds(creds: MlflowHostCreds) -> _Client | None:
        """None when the credentials ask for more than a header or a certificate (an auth plugin,
        AWS SigV4, the Databricks SDK, OAuth), or MLflow would add Databricks headers: then only
        MLflow's own client sends them right."""
        if (
            creds.auth
            or creds.aws_sigv4
            or creds.use_databricks_sdk
            or creds.client_secret
            or creds.workspace_id
            or os.environ.get("MLFLOW_DATABRICKS_TRAFFIC_ID")
        ):
            return None
        from mlflow.tracking.request_header.registry import resolve_request_headers

        return _Client(creds, dict(resolve_request_headers()))


def _workspace_header() -> Callable[[], dict[str, str]]:
    """The workspace header MLflow's client adds when a workspace is active (in MLflow versions
    that have workspaces)."""
    try:
        from mlflow.utils.workspace_context import get_request_workspace
        from mlflow.utils.workspace_utils import WORKSPACE_HEADER_NAME
    except ImportError:
        return dict

    def header() -> dict[str, str]:
        workspace = get_request_workspace()
        return {WORKSPACE_HEADER_NAME: workspace} if workspace else {}

    return header


class RestGateway:
    def __init__(self, tracking_uri: str) -> None:
        from mlflow.utils.credentials import get_default_host_creds

        self.tracking_uri = tracking_uri.rstrip("/")
        self._creds = get_default_host_creds(self.tracking_uri)
        self._client = _Client.for_creds(self._creds)  # None: MLflow's http_request, per request
        self._workspace_header = _workspace_header()
        self._experiments = _ExperimentCache()
        self._models = _ExperimentCache()

    def reserve_connections(self, connections: int) -> None:
        """Keep this many connections open (the writer's workers), so that no request waits for
        one and none is opened and thrown away. Call it before the requests start."""
        if self._client is not None:
            self._client.reserve(connections)

    def request(
        self, method: str, endpoint: str, *, extra_headers: dict[str, str] | None = None, **kwargs: Any
    ) -> Any:
        """One request to ``endpoint`` (a path) with MLflow's credentials and no retry: its JSON
        answer, or None. Failures raise ``GatewayError``."""
        try:
            if self._client is None:
                from mlflow.utils.rest_utils import http_request

                response = http_request(
                    self._creds,
                    endpoint,
                    method,
                    max_retries=0,
                    backoff_factor=0,
                    timeout=REQUEST_TIMEOUT_S,
                    extra_headers=extra_headers,
                    **kwargs,
                )
            else:
                headers = {**self._client.headers, **self._workspace_header(), **(extra_headers or {})}
                response = self._client.session.request(
                    method, self.tracking_uri + endpoint, headers=headers, **self._client.options, **kwargs
                )
        except Exception as exc:  # connection refused, timeout, TLS: all worth a retry
            raise GatewayError(f"{method} {self.tracking_uri}{endpoint}: {exc}") from exc
        if response.status_code >= 400:
            retryable = response.status_code in (408, 429) or response.status_code >= 500
            raise GatewayError(
                f"{method} {endpoint} answered {response.status_code}: {response.text[:500]}",
                retryable=retryable,
            ) from None
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return None

    def _api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, f"/api/2.0/mlflow/{path}", **kwargs)

    def experiment_id(self, name: str, tags: dict[str, str]) -> str:
        return self._experiments.get(name, lambda: self._find_or_create_experiment(name, tags))

    def _find_or_create_experiment(self, name: str, tags: dict[str, str]) -> str:
        found = self._find_experiment(name)
        if found is not None:
            return found
        try:
            created = self._api(
                "POST",
                "experiments/create",
                json={"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]},
            )
        except GatewayError as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
            found = self._find_experiment(name)  # another writer created it first
            if found is None:
                raise GatewayError(
                    f"experiment {name!r} exists, yet MLflow does not find it by name"
                ) from exc
            return found
        return str(created["experiment_id"])

    def _find_experiment(self, name: str) -> str | None:
        """The experiment's id, restored if it was soft-deleted; None if there is none."""
        try:
            found = self._api("GET", "experiments/get-by-name", params={"experiment_name": name})
        except GatewayError as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
            return None
        if not found:
            return None
        experiment = found["experiment"]
        if experiment.get("lifecycle_stage") == "deleted":
            self._api("POST", "experiments/restore", json={"experiment_id": experiment["experiment_id"]})
        return str(experiment["experiment_id"])

    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict[str, str]) -> str:
        body = {
            "experiment_id": experiment_id,
            "user_id": _USER,
            "run_name": name,
            "start_time": start_ms,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        try:
            return str(self._api("POST", "runs/create", json=body)["run"]["info"]["run_id"])
        except GatewayError as exc:
            if _DELETED_EXPERIMENT not in str(exc):
                raise
        # Someone soft-deleted the experiment since it was looked up: restore it, as
        # experiment_id() does for one found deleted, and try once more.
        self._api("POST", "experiments/restore", json={"experiment_id": experiment_id})
        return str(self._api("POST", "runs/create", json=body)["run"]["info"]["run_id"])

    def log_batch(
        self,
        run_id: str,
        params: dict[str, str],
        metrics: Sequence[tuple[str, float, int, int]],
        tags: dict[str, str],
    ) -> None:
        body = {
            "run_id": run_id,
            "params": [{"key": k, "value": v} for k, v in params.items()],
            "metrics": [{"key": k, "value": v, "timestamp": ts, "step": step} for k, v, ts, step in metrics],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        self._api("POST", "runs/log-batch", json=body)

    def end_run(self, run_id: str, status: str, end_ms: int) -> None:
        self._api("POST", "runs/update", json={"run_id": run_id, "status": status, "end_time": end_ms})

    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None:
        found = self._api(
            "POST",
            "runs/search",
            json={"experiment_ids": [experiment_id], "filter": f"tags.`{tag}` = '{value}'", "max_results": 1},
        )
        runs = (found or {}).get("runs") or []
        return str(runs[0]["info"]["run_id"]) if runs else None

    def post_traces(self, experiment_id: str, run_id: str | None, request: ExportTraceServiceRequest) -> None:
        headers = {"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id}
        if run_id is not None:
            headers["x-mlflow-run-id"] = run_id
        self.request("POST", OTLP_PATH, data=request.SerializeToString(), extra_headers=headers)

    def upload(self, run_id: str, offloads: Sequence[Offload]) -> None:
        _upload(self.tracking_uri, run_id, offloads)

    def artifact_uri(self, run_id: str, path: str) -> str:
        return f"runs:/{run_id}/{path}"

    def prompt_version_exists(self, name: str, version: str) -> bool:
        if not _could_be_prompt_version(name, version):
            return False
        try:
            found = self._api("GET", "model-versions/get", params={"name": name, "version": version})
        except GatewayError as exc:
            if _MISSING not in str(exc):
                raise
            return False
        tags = (found or {}).get("model_version", {}).get("tags") or []
        return _is_prompt_version({tag["key"]: tag.get("value", "") for tag in tags})

    def link_prompts(self, trace_id: str, prompts: Sequence[tuple[str, str]]) -> None:
        versions = [{"name": name, "version": version} for name, version in _prompt_versions(prompts)]
        if versions:
            body = {"trace_id": _mlflow_trace_id(trace_id), "prompt_versions": versions}
            self._api("POST", "traces/link-prompts", json=body)

    def add_prompt_experiment(self, name: str, experiment_id: str) -> None:
        found = self._api("GET", "registered-models/get", params={"name": name})
        tags = {tag["key"]: tag.get("value", "") for tag in found["registered_model"].get("tags") or []}
        value = _with_experiment(tags.get(_PROMPT_EXPERIMENTS, ""), experiment_id)
        if value is not None:
            body = {"name": name, "key": _PROMPT_EXPERIMENTS, "value": value}
            self._api("POST", "registered-models/set-tag", json=body)

    def logged_model_id(self, experiment_id: str, app_version: str) -> str:
        return self._models.get(
            f"{experiment_id}/{app_version}", lambda: self._find_or_create_model(experiment_id, app_version)
        )

    def _find_or_create_model(self, experiment_id: str, app_version: str) -> str:
        search = {
            "experiment_ids": [experiment_id],
            "filter": _version_filter(app_version),
            "max_results": 1,
            "order_by": _NEWEST_FIRST,
        }
        models = (self._api("POST", "logged-models/search", json=search) or {}).get("models") or []
        if models:
            info = models[0]["info"]
        else:
            create = {
                "experiment_id": experiment_id,
                "name": _model_name(app_version),
                "model_type": _MODEL_TYPE,
                "tags": [{"key": sc.GENAI_MLFLOW_APP_VERSION, "value": app_version}],
            }
            info = self._api("POST", "logged-models", json=create)["model"]["info"]
        model_id = str(info["model_id"])
        if info.get("status") != "LOGGED_MODEL_READY":  # also one whose creator stopped short of it
            ready = {"model_id": model_id, "status": "LOGGED_MODEL_READY"}
            self._api("PATCH", f"logged-models/{model_id}", json=ready)
        return model_id

    def link_trace_to_model(
        self, experiment_id: str, trace_id: str, timing: TraceTiming, model_id: str
    ) -> None:
        trace_info = {
            "trace_id": _mlflow_trace_id(trace_id),
            "trace_location": {
                "type": "MLFLOW_EXPERIMENT",
                "mlflow_experiment": {"experiment_id": experiment_id},
            },
            "request_time": _timestamp_json(timing.start_ms),
            "execution_duration": _duration_json(timing.duration_ms),
            "state": timing.state,
            "trace_metadata": {_MODEL_ID: model_id},
        }
        self.request("POST", "/api/3.0/mlflow/traces", json={"trace": {"trace_info": trace_info}})


class StoreGateway:
    """The embedded store: MLflow's store API in this process, as the server would call it."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking._tracking_service.utils import _get_store

        self.tracking_uri = tracking_uri
        self._store = _get_store(tracking_uri)
        self._experiments = _ExperimentCache()
        self._models = _ExperimentCache()
        self._lock = threading.Lock()  # sqlite takes one writer at a time

    def experiment_id(self, name: str, tags: dict[str, str]) -> str:
        return self._experiments.get(name, lambda: self._find_or_create_experiment(name, tags))

    def _find_or_create_experiment(self, name: str, tags: dict[str, str]) -> str:
        from mlflow.entities import ExperimentTag, LifecycleStage
        from mlflow.exceptions import MlflowException

        with self._lock:
            experiment = self._store.get_experiment_by_name(name)
            if experiment is not None:
                if experiment.lifecycle_stage == LifecycleStage.DELETED:
                    self._store.restore_experiment(experiment.experiment_id)
                return str(experiment.experiment_id)
            try:
                created = self._store.create_experiment(
                    name, tags=[ExperimentTag(k, v) for k, v in tags.items()]
                )
            except MlflowException as exc:
                raise GatewayError(str(exc), retryable=False) from exc
        return str(created)

    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict[str, str]) -> str:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        def create() -> str:
            created = self._store.create_run(
                experiment_id,
                user_id=_USER,
                start_time=start_ms,
                tags=[RunTag(k, v) for k, v in tags.items()],
                run_name=name,
            )
            return str(created.info.run_id)

        with self._lock:
            try:
                return create()
            except MlflowException as exc:
                if _DELETED_EXPERIMENT not in str(exc):
                    raise
            self._store.restore_experiment(experiment_id)  # deleted since it was looked up
            return create()

    def log_batch(
        self,
        run_id: str,
        params: dict[str, str],
        metrics: Sequence[tuple[str, float, int, int]],
        tags: dict[str, str],
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        with self._lock:
            self._store.log_batch(
                run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics],
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )

    def end_run(self, run_id: str, status: str, end_ms: int) -> None:
        from mlflow.entities import RunStatus

        with self._lock:
            self._store.update_run_info(run_id, RunStatus.from_string(status), end_ms, None)

    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None:
        from mlflow.entities import ViewType

        with self._lock:
            runs = self._store.search_runs(
                [experiment_id], f"tags.`{tag}` = '{value}'", ViewType.ALL, max_results=1
            )
        return runs[0].info.run_id if runs else None

    def post_traces(self, experiment_id: str, run_id: str | None, request: ExportTraceServiceRequest) -> None:
        from mlflow.entities import Span

        spans = []
        roots = []
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for proto in scope_spans.spans:
                    span = Span.from_otel_proto(proto, resource=resource_spans.resource)
                    spans.append(span)
                    if not proto.parent_span_id:
                        roots.append(span.trace_id)
        with self._lock:
            self._store.log_spans(experiment_id, spans)
            if run_id is not None and roots:
                self._store.link_traces_to_run(sorted(set(roots)), run_id)

    def upload(self, run_id: str, offloads: Sequence[Offload]) -> None:
        _upload(self.tracking_uri, run_id, offloads)

    def artifact_uri(self, run_id: str, path: str) -> str:
        return f"runs:/{run_id}/{path}"

    @cached_property
    def _registry(self) -> Any:
        """The model registry store for the same URI (the Prompt Registry lives there)."""
        from mlflow.tracking._model_registry.utils import _get_store

        return _get_store(self.tracking_uri)

    def prompt_version_exists(self, name: str, version: str) -> bool:
        if not _could_be_prompt_version(name, version):
            return False
        try:
            with self._lock, _store_errors():
                found = self._registry.get_model_version(name, version)
        except GatewayError as exc:
            if _MISSING not in str(exc):
                raise
            return False
        return _is_prompt_version(found.tags)

    def link_prompts(self, trace_id: str, prompts: Sequence[tuple[str, str]]) -> None:
        from mlflow.entities.model_registry import PromptVersion

        versions = [
            PromptVersion(name, int(version), template="")  # type: ignore[abstract]  # as MLflow's handler
            for name, version in _prompt_versions(prompts)
        ]
        if versions:
            with self._lock, _store_errors():
                self._store.link_prompts_to_trace(_mlflow_trace_id(trace_id), versions)

    def add_prompt_experiment(self, name: str, experiment_id: str) -> None:
        from mlflow.entities.model_registry import RegisteredModelTag

        with self._lock, _store_errors():
            model = self._registry.get_registered_model(name)
            value = _with_experiment(model.tags.get(_PROMPT_EXPERIMENTS, ""), experiment_id)
            if value is not None:
                self._registry.set_registered_model_tag(name, RegisteredModelTag(_PROMPT_EXPERIMENTS, value))

    def logged_model_id(self, experiment_id: str, app_version: str) -> str:
        return self._models.get(
            f"{experiment_id}/{app_version}", lambda: self._find_or_create_model(experiment_id, app_version)
        )

    def _find_or_create_model(self, experiment_id: str, app_version: str) -> str:
        from mlflow.entities import LoggedModelStatus, LoggedModelTag

        with self._lock, _store_errors():
            found = self._store.search_logged_models(
                [experiment_id], _version_filter(app_version), max_results=1, order_by=_NEWEST_FIRST
            )
            model = (
                found[0]
                if found
                else self._store.create_logged_model(
                    experiment_id,
                    _model_name(app_version),
                    tags=[LoggedModelTag(sc.GENAI_MLFLOW_APP_VERSION, app_version)],
                    model_type=_MODEL_TYPE,
                )
            )
            if model.status != LoggedModelStatus.READY:  # also one whose creator stopped short of it
                self._store.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return str(model.model_id)

    def link_trace_to_model(
        self, experiment_id: str, trace_id: str, timing: TraceTiming, model_id: str
    ) -> None:
        from mlflow.entities import TraceInfo, TraceLocation, TraceState

        trace_info = TraceInfo(
            trace_id=_mlflow_trace_id(trace_id),
            trace_location=TraceLocation.from_experiment_id(experiment_id),
            request_time=timing.start_ms,
            execution_duration=timing.duration_ms,
            state=TraceState(timing.state),
            trace_metadata={_MODEL_ID: model_id},
        )
        with self._lock, _store_errors():
            self._store.start_trace(trace_info)


def _upload(tracking_uri: str, run_id: str, offloads: Sequence[Offload]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for offload in offloads:
        try:
            client.log_text(run_id, offload.content, offload.artifact_path)
        except Exception as exc:
            raise GatewayError(f"uploading {offload.artifact_path} to run {run_id}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# What both gateways share: pure functions, no I/O


def _is_integer(version: str) -> bool:
    return version.isascii() and version.isdigit()


def _could_be_prompt_version(name: str, version: str) -> bool:
    """False for what the Prompt Registry cannot hold (MLflow answers 400 for some of it, not 404)."""
    return bool(_PROMPT_NAME.match(name)) and _is_integer(version)


def _is_prompt_version(tags: dict[str, str]) -> bool:
    """A prompt's version, not a model's: MLflow writes both tags on every prompt version, and tells
    them apart by the first (``ModelVersion._is_prompt``)."""
    return tags.get(_IS_PROMPT, "").lower() == "true" or _PROMPT_TEXT in tags


def _prompt_versions(prompts: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each (name, integer version) once: MLflow stores one row per version and rejects a repeat
    within a request; a version that is not an integer (an alias) gets an HTML 500."""
    versions: dict[tuple[str, str], None] = {}
    for name, version in prompts:
        if not _is_integer(version):
            raise GatewayError(
                f"prompt {name!r}: version {version!r} is not a number (resolve aliases first)",
                retryable=False,
            )
        versions[(name, str(int(version)))] = None
    return list(versions)


def _mlflow_trace_id(trace_id: str) -> str:
    """MLflow's id of an OpenTelemetry trace (32 hex digits)."""
    return trace_id if trace_id.startswith("tr-") else f"tr-{trace_id}"


def _with_experiment(experiment_ids: str, experiment_id: str) -> str | None:
    """A prompt's ``_mlflow_experiment_ids`` with the experiment added, as ``load_prompt`` writes it
    (",0,1,"), or None if it is there already."""
    ids = [i.strip() for i in experiment_ids.split(",") if i.strip()]
    if experiment_id in ids:
        return None
    return f",{','.join([*ids, experiment_id])},"


def _model_name(app_version: str) -> str:
    """A readable LoggedModel name for an app version (``v1.2.3`` → ``app-v1_2_3``): MLflow rejects
    ``/ : . % " '`` in names. Names need not be unique; the exact version is in a tag."""
    return "app-" + re.sub(r"[^\w+-]", "_", app_version)[:_MODEL_NAME_CHARS]


def _version_filter(app_version: str) -> str:
    """The LoggedModel search filter for exactly this app version. With ``=``, MLflow takes the text
    between the quotes as is (no escapes: a ``'`` cannot be written); ``IN (...)`` reads a Python
    literal, so ``repr`` quotes any string."""
    return f"tags.`{sc.GENAI_MLFLOW_APP_VERSION}` IN ({app_version!r})"


def _timestamp_json(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _duration_json(ms: int) -> str:
    seconds, millis = divmod(max(ms, 0), 1000)
    return f"{seconds}.{millis:03d}s"


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """MLflow's store errors as the server would answer them: retryable for 408, 429 and 5xx."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise _store_error(exc) from exc


def _store_error(exc: MlflowException) -> GatewayError:
    status = exc.get_http_status_code()
    return GatewayError(f"{exc.error_code}: {exc.message}", retryable=status in (408, 429) or status >= 500)
