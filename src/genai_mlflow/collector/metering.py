"""A gateway that measures what the writer does: each MLflow call timed and its failures counted,
and the LLM calls of every trace it posts counted in tokens, cost and duration (by persona and
model, from the records layer and the writer's own price table, so that they match the runs).

It wraps the gateway the shared ``Writer`` is given; the writer itself is unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from genai_mlflow import semconv as sc
from genai_mlflow.exporter import records
from genai_mlflow.exporter.gateway import Gateway
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.records import Offload, TraceTiming

from .metrics import CollectorMetrics

T = TypeVar("T")
logger = logging.getLogger("genai_mlflow.collector")
# Trace ids whose calls were counted: a trace posted again (a retry after a later step failed,
# a replay) is not counted twice. Bounded; the oldest are forgotten first.
COUNTED_TRACES_MAX = 100_000


class CallCounter:
    """Counts the LLM calls of posted traces into the ``genai_*`` metrics, each trace once."""

    def __init__(self, metrics: CollectorMetrics, prices: PriceTable) -> None:
        self._metrics = metrics
        self._prices = prices
        self._counted: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, request: ExportTraceServiceRequest) -> None:
        for trace in records.local_traces(request):
            with self._lock:
                if trace.trace_id in self._counted:
                    continue
                self._counted[trace.trace_id] = None
                while len(self._counted) > COUNTED_TRACES_MAX:
                    self._counted.popitem(last=False)
            for point in records.window_points(trace, self._prices):
                persona, model = point.persona, point.model
                metrics = point.metrics
                self._metrics.tokens.inc(metrics.get(sc.METRIC_PROMPT_TOKENS, 0.0), persona, model, "input")
                self._metrics.tokens.inc(
                    metrics.get(sc.METRIC_COMPLETION_TOKENS, 0.0), persona, model, "output"
                )
                cost = metrics.get(sc.METRIC_COST_USD)
                if cost is not None:
                    self._metrics.cost.inc(cost, persona, model)
                self._metrics.call_duration.observe(
                    metrics.get(sc.METRIC_LATENCY_MS, 0.0) / 1000.0, persona, model
                )


class MeteredGateway:
    """Every ``Gateway`` call passed through, timed; posted traces counted by ``CallCounter``."""

    def __init__(self, inner: Gateway, metrics: CollectorMetrics, calls: CallCounter) -> None:
        self._inner = inner
        self._metrics = metrics
        self._calls = calls
        self.tracking_uri = inner.tracking_uri

    def _timed(self, operation: str, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            result = call()
        except BaseException:
            self._metrics.mlflow_errors.inc(1.0, operation)
            raise
        finally:
            self._metrics.mlflow_latency.observe(time.perf_counter() - start, operation)
        return result

    def experiment_id(self, name: str, tags: dict[str, str]) -> str:
        return self._timed("experiment_id", lambda: self._inner.experiment_id(name, tags))

    def create_run(self, experiment_id: str, name: str, start_ms: int, tags: dict[str, str]) -> str:
        return self._timed("create_run", lambda: self._inner.create_run(experiment_id, name, start_ms, tags))

    def log_batch(
        self,
        run_id: str,
        params: dict[str, str],
        metrics: Sequence[tuple[str, float, int, int]],
        tags: dict[str, str],
    ) -> None:
        self._timed("log_batch", lambda: self._inner.log_batch(run_id, params, metrics, tags))

    def end_run(self, run_id: str, status: str, end_ms: int) -> None:
        self._timed("end_run", lambda: self._inner.end_run(run_id, status, end_ms))

    def find_run(self, experiment_id: str, tag: str, value: str) -> str | None:
        return self._timed("find_run", lambda: self._inner.find_run(experiment_id, tag, value))

    def post_traces(self, experiment_id: str, run_id: str | None, request: ExportTraceServiceRequest) -> None:
        self._timed("post_traces", lambda: self._inner.post_traces(experiment_id, run_id, request))
        try:
            self._calls.observe(request)
        except Exception:  # metrics must never fail a write that succeeded
            logger.debug("genai-mlflow collector could not count the calls of posted traces", exc_info=True)

    def upload(self, run_id: str, offloads: Sequence[Offload]) -> None:
        self._timed("upload", lambda: self._inner.upload(run_id, offloads))

    def artifact_uri(self, run_id: str, path: str) -> str:
        return self._inner.artifact_uri(run_id, path)

    def prompt_version_exists(self, name: str, version: str) -> bool:
        return self._timed("prompt_version_exists", lambda: self._inner.prompt_version_exists(name, version))

    def link_prompts(self, trace_id: str, prompts: Sequence[tuple[str, str]]) -> None:
        self._timed("link_prompts", lambda: self._inner.link_prompts(trace_id, prompts))

    def add_prompt_experiment(self, name: str, experiment_id: str) -> None:
        self._timed("add_prompt_experiment", lambda: self._inner.add_prompt_experiment(name, experiment_id))

    def logged_model_id(self, experiment_id: str, app_version: str) -> str:
        return self._timed("logged_model_id", lambda: self._inner.logged_model_id(experiment_id, app_version))

    def link_trace_to_model(
        self, experiment_id: str, trace_id: str, timing: TraceTiming, model_id: str
    ) -> None:
        self._timed(
            "link_trace_to_model",
            lambda: self._inner.link_trace_to_model(experiment_id, trace_id, timing, model_id),
        )

    def __getattr__(self, name: str) -> Any:  # anything else a gateway offers (reserve_connections)
        return getattr(self._inner, name)
