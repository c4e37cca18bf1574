"""The collector minus HTTP: the shared spool and writer, the ingest stage, load shedding, health
and metrics, and the answer to each request. ``app.py`` puts it behind an HTTP server.

The spool and writer are the exporter's own (``Spool``, ``Writer``, held in a ``setup.Pipeline``):
a span that reaches the collector takes the same path to MLflow as one ended in an app. The only
addition is a gateway wrapper that measures the writer's MLflow calls (``metering.py``).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from genai_mlflow.config import Settings
from genai_mlflow.exporter.gateway import make_gateway
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.processor import DurableSpanProcessor
from genai_mlflow.exporter.spool import Spool, SpoolStatus
from genai_mlflow.setup import Pipeline, new_writer
from genai_mlflow.throttle import Throttle

from . import otlp
from .config import CollectorConfig
from .gate import TraceGate
from .ingest import Ingestor
from .metering import CallCounter, MeteredGateway
from .metrics import CollectorMetrics, Sample

logger = logging.getLogger("genai_mlflow.collector")

RETRY_AFTER_BUSY_S = 1  # too many requests at once, or too fast: try again soon
RETRY_AFTER_FULL_S = 10  # the spool is (nearly) full: MLflow is slow or down
RETRY_AFTER_STOPPING_S = 5
# A trace from several services comes in parts, each when its service's exporter sends it (the
# SDK's batch processor waits up to 5 s): a whole part waits this long for the others.
TRACE_SETTLE_S = 10.0
# Memory over its limit sheds only while at least this much waits in the spool: memory the
# allocator keeps after a backlog has drained must not refuse requests for good.
MEMORY_BACKLOG_BYTES = 8 << 20
HEALTH_INTERVAL_S = 5.0
HEALTH_TIMEOUT_S = 2.0
_SEGMENT = re.compile(r"^seg-.*\.log$")
_WARN_EVERY_S = 10.0


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False  # close the connection after answering (the body may be unread)


BodyReader = Callable[[int], bytes]  # reads the request body, at most n bytes, else RequestError 413


class Guard:
    """Admission: at most ``max_inflight`` requests at once and, if ``max_rps`` > 0, a token
    bucket of that many requests per second (bursts of up to one second's worth)."""

    def __init__(
        self, max_inflight: int, max_rps: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_inflight = max_inflight
        self._rate = max_rps
        self._burst = max(1.0, max_rps)
        self._tokens = self._burst
        self._clock = clock
        self._stamp = clock()
        self._inflight = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def inflight(self) -> int:
        return self._inflight

    def enter(self) -> str | None:
        """None if the request may go ahead (call ``leave`` after), else why not."""
        with self._lock:
            if self._inflight >= self._max_inflight:
                return "inflight"
            if self._rate > 0:
                now = self._clock()
                self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
                self._stamp = now
                if self._tokens < 1.0:
                    return "rate"
                self._tokens -= 1.0
            self._inflight += 1
            return None

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True


class SpoolUsage:
    """The spool directory's size, measured at most every ``interval_s``: cheap enough to ask on
    every request (``Spool.status()`` walks the records, for ``/metrics`` only)."""

    def __init__(self, directory: str, interval_s: float = 0.5) -> None:
        self._dir = directory
        self._interval = interval_s
        self._next = 0.0
        self._bytes = 0
        self._lock = threading.Lock()

    def bytes(self) -> int:
        now = time.monotonic()
        if now >= self._next:
            with self._lock:
                if now >= self._next:
                    self._next = now + self._interval
                    self._bytes = _segments_size(self._dir)
        return self._bytes


def _segments_size(directory: str) -> int:
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if _SEGMENT.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
    return total


class MemoryGuard:
    """The process's resident memory against a limit, measured at most every ``interval_s``.

    While MLflow is down the writer keeps what it has read from the spool in memory, so a growing
    backlog grows the process too. Over the limit, new requests are refused (503) while a backlog
    waits; the limit defaults to 80% of the container's memory limit (cgroup), if there is one.
    """

    def __init__(self, limit_bytes: int | None, interval_s: float = 0.5) -> None:
        self.limit_bytes = limit_bytes
        self._interval = interval_s
        self._next = 0.0
        self._rss = 0

    @staticmethod
    def container_limit() -> int | None:
        for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            try:
                with open(path, encoding="ascii") as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < (1 << 60):  # "max" or a huge number: no limit
                return int(text)
        return None

    def rss(self) -> int:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self._interval
            try:
                with open("/proc/self/statm", encoding="ascii") as f:
                    self._rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                self._rss = 0
        return self._rss

    def over(self) -> bool:
        return self.limit_bytes is not None and self.rss() > self.limit_bytes


class MlflowHealth:
    """Whether MLflow answers ``/health``, checked in the background every few seconds. A tracking
    URI that is not a server (a local database) counts as reachable."""

    def __init__(self, tracking_uri: str) -> None:
        self._url = tracking_uri.rstrip("/") + "/health" if tracking_uri.startswith("http") else None
        self.reachable = self._url is None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._url is None:
            return
        self._check()
        self._thread = threading.Thread(target=self._run, name="genai-mlflow-collector-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_INTERVAL_S):
            self._check()

    def _check(self) -> None:
        assert self._url is not None
        try:
            with urllib.request.urlopen(self._url, timeout=HEALTH_TIMEOUT_S) as response:
                self.reachable = response.status == 200
        except Exception:
            self.reachable = False


class CollectorService:
    """Everything the HTTP server asks: ``export`` for ``POST /v1/traces``, ``health``, ``ready``,
    ``metrics``, and ``shutdown``."""

    def __init__(self, settings: Settings, config: CollectorConfig) -> None:
        self.settings = settings
        self.config = config
        self.metrics = CollectorMetrics.create()
        prices = PriceTable.load(settings.prices)
        spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes, fsync=settings.fsync)
        gateway = MeteredGateway(
            make_gateway(settings.tracking_uri), self.metrics, CallCounter(self.metrics, prices)
        )
        writer = new_writer(settings, spool, gateway, prices, settle_s=TRACE_SETTLE_S)
        # The pipeline an app would have; its span processor stays idle: spans come over HTTP.
        self.pipeline = Pipeline(settings, spool, DurableSpanProcessor(spool), writer)
        self.gate = TraceGate(held_max_bytes=config.held_max_bytes)
        self.ingestor = Ingestor(self._append, self.gate, self.metrics)
        self.guard = Guard(config.max_inflight, config.max_rps)
        self.usage = SpoolUsage(spool.directory)
        self.memory = MemoryGuard(_memory_limit(config.max_memory_bytes))
        self.mlflow = MlflowHealth(settings.tracking_uri)
        self.stopping = False
        self._token = config.token.encode() if config.token else None
        self._high_water = int(settings.spool_max_bytes * config.spool_high_water)
        self._status_cache: tuple[float, SpoolStatus] | None = None
        self._status_lock = threading.Lock()
        self._bad_request_log = Throttle(_WARN_EVERY_S)
        self._register_observed()

    def start(self) -> None:
        self.pipeline.writer.start()
        self.mlflow.start()

    # --- export --------------------------------------------------------------------------------

    def _append(self, payload: bytes) -> bool:
        appended = self.pipeline.spool.append(payload)
        if appended:
            self.pipeline.writer.wake()
        return appended

    def export(self, headers: Mapping[str, str], read_body: BodyReader) -> Reply:
        """The answer to ``POST /v1/traces``; ``headers`` with lower-case names."""
        fmt = _format_hint(headers.get("content-type"))
        reply = self._export(headers, read_body, fmt)
        self.metrics.requests.inc(1.0, str(reply.status))
        return reply

    def _export(self, headers: Mapping[str, str], read_body: BodyReader, fmt: str | None) -> Reply:
        if self._token is not None and not self._authorised(headers.get("authorization")):
            reply = _error(fmt, 401, "missing or wrong bearer token", close=True)
            reply.headers["WWW-Authenticate"] = 'Bearer realm="genai-mlflow-collector"'
            return reply
        if self.stopping:
            return self._shed(
                fmt, 503, "shutting_down", "the collector is shutting down", RETRY_AFTER_STOPPING_S
            )
        refused = self.guard.enter()
        if refused is not None:
            what = "too many requests at once" if refused == "inflight" else "request rate over the limit"
            return self._shed(fmt, 429, refused, what, RETRY_AFTER_BUSY_S)
        try:
            if self.usage.bytes() >= self._high_water:
                return self._shed(fmt, 503, "spool_full", "the spool is nearly full", RETRY_AFTER_FULL_S)
            if self.memory.over() and self.usage.bytes() > MEMORY_BACKLOG_BYTES:
                return self._shed(fmt, 503, "memory", "memory is over its limit", RETRY_AFTER_FULL_S)
            try:
                fmt = otlp.request_format(headers.get("content-type"))
                raw = read_body(self.config.max_body_bytes)
                body = otlp.decode_body(raw, headers.get("content-encoding"), self.config.max_body_bytes)
                result = self.ingestor.ingest(body, fmt)
            except otlp.RequestError as exc:
                if self._bad_request_log.ready():
                    logger.warning(
                        "genai-mlflow collector refused a request (%d): %s", exc.status, exc.message
                    )
                return _error(fmt, exc.status, exc.message, close=exc.status in (411, 413))
            if not result.spooled:
                return self._shed(fmt, 503, "spool_full", "the spool refused the spans", RETRY_AFTER_FULL_S)
            message = result.rejected.message()
            return Reply(200, fmt, otlp.export_response(fmt, result.rejected.total, message))
        finally:
            self.guard.leave()

    def _authorised(self, header: str | None) -> bool:
        assert self._token is not None
        scheme, _, credentials = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)

    def _shed(self, fmt: str | None, status: int, reason: str, message: str, retry_after: int) -> Reply:
        self.metrics.shed.inc(1.0, reason)
        reply = _error(fmt, status, message)
        reply.headers["Retry-After"] = str(retry_after)
        return reply

    # --- health ----------------------------------------------------------------------------------

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready: not stopping, the spool directory writable, and MLflow reachable or room in the spool."""
        spool_dir = self.pipeline.spool.directory
        writable = os.access(spool_dir, os.W_OK)
        room = self.usage.bytes() < self._high_water and not (
            self.memory.over() and self.usage.bytes() > MEMORY_BACKLOG_BYTES
        )
        checks = {
            "stopping": self.stopping,
            "spool_writable": writable,
            "spool_has_room": room,
            "mlflow_reachable": self.mlflow.reachable,
        }
        return (not self.stopping and writable and (self.mlflow.reachable or room)), checks

    def spool_status(self) -> SpoolStatus:
        """``Spool.status()``, at most once a second (it walks the records)."""
        with self._status_lock:
            now = time.monotonic()
            if self._status_cache is None or now - self._status_cache[0] > 1.0:
                self._status_cache = (now, self.pipeline.spool.status())
            return self._status_cache[1]

    def metrics_text(self) -> str:
        return self.metrics.registry.render()

    def _register_observed(self) -> None:
        r = self.metrics.registry
        writer = self.pipeline.writer
        spool = self.pipeline.spool

        def one(read: Callable[[], float]) -> Callable[[], Iterable[Sample]]:
            return lambda: [((), read())]

        r.observed(
            "genai_collector_spool_records",
            "Records waiting in the spool.",
            one(lambda: self.spool_status().pending_records),
        )
        r.observed(
            "genai_collector_spool_bytes",
            "Bytes of the spool's segment files.",
            one(self.usage.bytes),
        )
        r.observed(
            "genai_collector_spool_max_bytes",
            "The spool's bound in bytes.",
            one(lambda: self.settings.spool_max_bytes),
        )
        r.observed(
            "genai_collector_spool_dropped_records_total",
            "Records the spool could not take (over its bound, or an I/O error).",
            one(lambda: spool.dropped),
            kind="counter",
        )
        r.observed(
            "genai_collector_traces_landed_total",
            "Traces the writer landed in MLflow.",
            one(lambda: writer.landed),
            kind="counter",
        )
        r.observed(
            "genai_collector_traces_failed_total",
            "Traces the writer gave up on (an error a retry cannot fix; kept in the spool).",
            one(lambda: writer.failed),
            kind="counter",
        )
        r.observed(
            "genai_collector_late_spans_total",
            "Spans that came after their trace had landed in MLflow: dropped (a landed trace is not "
            "amended).",
            one(lambda: writer.late_spans),
            kind="counter",
        )
        r.observed(
            "genai_collector_inflight_requests",
            "Export requests being processed.",
            one(lambda: self.guard.inflight),
        )
        r.observed(
            "genai_collector_held_spans",
            "Spans waiting for their trace's GenAI span.",
            one(lambda: self.gate.held_spans),
        )
        r.observed(
            "genai_collector_held_bytes",
            "Bytes of the spans waiting for their trace's GenAI span.",
            one(lambda: self.gate.held_bytes),
        )
        r.observed(
            "genai_collector_mlflow_up",
            "1 if MLflow answered its last health check.",
            one(lambda: float(self.mlflow.reachable)),
        )
        r.observed(
            "genai_collector_memory_bytes", "Resident memory of the collector process.", one(self.memory.rss)
        )
        r.observed("genai_collector_ready", "1 if /readyz answers 200.", one(lambda: float(self.ready()[0])))

    # --- lifecycle -------------------------------------------------------------------------------

    def shutdown(self, grace_s: float) -> bool:
        """Refuse new requests, let those in flight finish, then flush to MLflow within the grace
        period. True if everything landed; what did not stays in the spool for the next start."""
        deadline = time.monotonic() + grace_s
        self.stopping = True
        if not self.guard.wait_idle(max(0.0, deadline - time.monotonic())):
            logger.warning("genai-mlflow collector: requests still in flight at the end of the grace period")
        discarded = self.gate.discard_all()
        if discarded:
            self.metrics.spans_discarded.inc(discarded, "shutdown")
        self.mlflow.stop()
        flushed = self.pipeline.shutdown(timeout_s=max(0.1, deadline - time.monotonic()))
        if not flushed:
            logger.warning(
                "genai-mlflow collector: not everything landed within the grace period; "
                "the rest stays in the spool %s for the next start",
                self.pipeline.spool.directory,
            )
        return flushed


def _memory_limit(configured: int) -> int | None:
    """``configured`` bytes; 0: 80% of the container's limit, or none outside a container."""
    if configured > 0:
        return configured
    container = MemoryGuard.container_limit()
    return int(container * 0.8) if container else None


def _format_hint(content_type: str | None) -> str | None:
    try:
        return otlp.request_format(content_type)
    except otlp.RequestError:
        return None


def _error(fmt: str | None, status: int, message: str, *, close: bool = False) -> Reply:
    content_type, body = otlp.error_response(fmt, status, message)
    return Reply(status, content_type, body, close=close)
