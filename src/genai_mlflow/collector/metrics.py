"""The collector's metrics, and their Prometheus text exposition (format 0.0.4). No dependencies.

Label sets are bounded per metric (``MAX_SERIES``): past the bound, new label values are counted
under ``_other``, so a flood of personas or models cannot grow the collector's memory without end.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from genai_mlflow import semconv as sc

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
MAX_SERIES: Final = 2000
OTHER: Final = "_other"
MLFLOW_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[str, ...]
Sample = tuple[Labels, float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, values: Sequence[str], known: Mapping[Labels, object]) -> Labels:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {key}")
        if key not in known and len(known) >= MAX_SERIES:
            return tuple(OTHER for _ in key)
        return key

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            key = self._key(labels, self._values)
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(labels), 0.0)

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_label_text(self.label_names, k)} {_format_value(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Iterable[float] = ()
    ) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket, [sum]

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            key = self._key(labels, self._series)
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = ([0] * (len(self.buckets) + 1), [0.0])
            counts, total = series
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            total[0] += value

    def count(self, *labels: str) -> int:
        with self._lock:
            series = self._series.get(tuple(labels))
            return sum(series[0]) if series else 0

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._series.items())
        out = []
        for key, (counts, total) in items:
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                le = 'le="' + _format_value(bound) + '"'
                out.append(f"{self.name}_bucket{_label_text(self.label_names, key, le)} {cumulative}")
            labels = _label_text(self.label_names, key)
            out.append(f"{self.name}_sum{labels} {_format_value(total)}")
            out.append(f"{self.name}_count{labels} {cumulative}")
        return out


class Observed(_Metric):
    """A gauge or counter whose samples are read from elsewhere at each scrape."""

    def __init__(
        self,
        name: str,
        help_text: str,
        read: Callable[[], Iterable[Sample]],
        labels: Sequence[str] = (),
        kind: str = "gauge",
    ) -> None:
        super().__init__(name, help_text, labels)
        self.kind = kind
        self._read = read

    def lines(self) -> list[str]:
        return [
            f"{self.name}{_label_text(self.label_names, k)} {_format_value(float(v))}"
            for k, v in self._read()
        ]


class Registry:
    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labels)
        self.add(metric)
        return metric

    def histogram(
        self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Iterable[float] = ()
    ) -> Histogram:
        metric = Histogram(name, help_text, labels, buckets)
        self.add(metric)
        return metric

    def observed(
        self,
        name: str,
        help_text: str,
        read: Callable[[], Iterable[Sample]],
        labels: Sequence[str] = (),
        kind: str = "gauge",
    ) -> Observed:
        metric = Observed(name, help_text, read, labels, kind)
        self.add(metric)
        return metric

    def render(self) -> str:
        out: list[str] = []
        for metric in self._metrics:
            try:
                lines = metric.lines()
            except Exception as exc:  # a broken reader must not break the whole scrape
                out.append(f"# {metric.name} unavailable: {type(exc).__name__}")
                continue
            out.extend(metric.header())
            out.extend(lines)
        return "\n".join(out) + "\n"


@dataclass
class CollectorMetrics:
    """Every metric the collector keeps itself; values read at scrape time are added by the app."""

    registry: Registry
    requests: Counter
    spans_received: Counter
    spans_accepted: Counter
    spans_rejected: Counter
    spans_discarded: Counter
    shed: Counter
    mlflow_latency: Histogram
    mlflow_errors: Counter
    tokens: Counter
    cost: Counter
    call_duration: Histogram

    @classmethod
    def create(cls, registry: Registry | None = None) -> CollectorMetrics:
        r = registry or Registry()
        return cls(
            registry=r,
            requests=r.counter(
                "genai_collector_requests_total", "OTLP export requests answered, by HTTP status.", ["code"]
            ),
            spans_received=r.counter(
                "genai_collector_spans_received_total", "Spans in readable export requests, valid or not."
            ),
            spans_accepted=r.counter(
                "genai_collector_spans_accepted_total", "Valid spans accepted (spooled, or held for a while)."
            ),
            spans_rejected=r.counter(
                "genai_collector_spans_rejected_total",
                "Invalid spans left out of readable requests (OTLP partial success), by reason.",
                ["reason"],
            ),
            spans_discarded=r.counter(
                "genai_collector_spans_discarded_total",
                "Valid spans not written: their trace had no GenAI span in time (no_genai), or the "
                "memory bound for such spans was hit (held_overflow), or the spool refused them "
                "(spool_full).",
                ["reason"],
            ),
            shed=r.counter(
                "genai_collector_requests_shed_total",
                "Requests refused with 429 or 503 and Retry-After, by reason.",
                ["reason"],
            ),
            mlflow_latency=r.histogram(
                "genai_collector_mlflow_request_duration_seconds",
                "Duration of the writer's MLflow calls, by operation.",
                ["operation"],
                MLFLOW_LATENCY_BUCKETS,
            ),
            mlflow_errors=r.counter(
                "genai_collector_mlflow_errors_total",
                "The writer's failed MLflow calls, by operation.",
                ["operation"],
            ),
            tokens=r.counter(
                "genai_tokens_total",
                "Tokens of the LLM calls written to MLflow, by persona, model and type (input, output).",
                ["persona", "model", "type"],
            ),
            cost=r.counter(
                "genai_cost_usd_total",
                "Cost in USD of the LLM calls written to MLflow (the price table's), by persona and model.",
                ["persona", "model"],
            ),
            call_duration=r.histogram(
                "genai_call_duration_seconds",
                "Duration of the LLM calls written to MLflow, by persona and model.",
                ["persona", "model"],
                sc.DURATION_BUCKETS,
            ),
        )
