"""Wiring: the tracer provider, the durable processor, the spool, the writer and the instrumentor.

``instrument()`` builds this once per process. Under the ``opentelemetry-instrument`` launcher the
distro's configurator builds it first, and ``instrument()`` finds it there. After ``os.fork()`` the
child gets a writer of its own (the spool's appender reopens by itself); only one writer at a time
drains a spool, so nothing is written twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from genai_mlflow import registry_hook
from genai_mlflow.config import Settings, is_disabled, resolve_capture_content
from genai_mlflow.exporter.gateway import Gateway, make_gateway
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.exporter.processor import DurableSpanProcessor
from genai_mlflow.exporter.spool import Spool
from genai_mlflow.exporter.writer import Writer
from genai_mlflow.instrumentation.openai import OpenAIInstrumentor
from genai_mlflow.instrumentation.openai.finisher import FINISHER

logger = logging.getLogger("genai_mlflow")

# How long the app's own writer leaves the drain lock to a writer process it just started.
PROCESS_WRITER_STANDBY_S = 15.0
_lock = threading.RLock()
_pipelines: dict[str, Pipeline] = {}  # by spool directory


class _Current:
    handle: Handle | None = None


_current = _Current()


@dataclass
class Pipeline:
    """The spool, its processor and its writer for one tracking URI."""

    settings: Settings
    spool: Spool
    processor: DurableSpanProcessor
    writer: Writer
    closed: bool = False
    providers: set[int] = field(default_factory=set)  # ids of the tracer providers it is attached to
    drain_process: subprocess.Popen[bytes] | None = None

    @classmethod
    def build(cls, settings: Settings) -> Pipeline:
        spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes, fsync=settings.fsync)
        writer = new_writer(settings, spool)
        processor = DurableSpanProcessor(spool, on_appended=writer.wake)
        pipeline = cls(settings, spool, processor, writer)
        if settings.writer == "process":
            # The drain process takes the spool's drain lock; this writer stands by in case it dies.
            from genai_mlflow.exporter.drain_process import spawn

            pipeline.drain_process = spawn(settings)
            processor.on_appended = None
            writer.start(standby_s=PROCESS_WRITER_STANDBY_S)
        else:
            writer.start()
        return pipeline

    def restart_writer_after_fork(self) -> None:
        self.writer = new_writer(self.settings, self.spool)
        self.processor.on_appended = self.writer.wake
        self.writer.start()

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        if not FINISHER.flush(timeout_s):  # calls that ended but whose spans are not yet ended
            return False
        return self.writer.flush(max(0.0, deadline - time.monotonic()))

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        if self.closed:
            return True
        self.closed = True
        FINISHER.flush(timeout_s)
        with _lock:
            if not any(not p.closed for p in _pipelines.values()):
                FINISHER.enabled = False  # nothing drains it any more: finish inline
        self.processor.shutdown()
        flushed = self.writer.shutdown(timeout_s)
        if self.drain_process is not None and self.drain_process.poll() is None:
            self.drain_process.terminate()  # it drains what is left, then exits
        self.spool.close()
        return flushed


def new_writer(
    settings: Settings,
    spool: Spool,
    gateway: Gateway | None = None,
    prices: PriceTable | None = None,
    settle_s: float = 0.0,
) -> Writer:
    """The writer these settings describe; the collector passes its metered gateway and a settle
    time for traces that several services send."""
    return Writer(
        spool,
        gateway or make_gateway(settings.tracking_uri),
        prices or PriceTable.load(settings.prices),
        mode=settings.mode,
        workers=settings.workers,
        content_bound=settings.content_bound,
        max_pending_bytes=settings.max_pending_bytes,
        settle_s=settle_s,
    )


def get_pipeline(settings: Settings) -> Pipeline:
    """The one pipeline of this process for these settings' spool."""
    with _lock:
        key = str(settings.spool_dir)
        pipeline = _pipelines.get(key)
        if pipeline is None or pipeline.closed:
            pipeline = _pipelines[key] = Pipeline.build(settings)
        return pipeline


def attach(pipeline: Pipeline, provider: TracerProvider) -> None:
    """Add the pipeline's durable processor to ``provider``, once."""
    with _lock:
        if id(provider) not in pipeline.providers:
            pipeline.providers.add(id(provider))
            provider.add_span_processor(pipeline.processor)
        # LLM spans are finished off the app's thread from now on: this pipeline drains them
        # at flush, shutdown and exit.
        FINISHER.enabled = True
    registry_hook.install()


def sdk_tracer_provider() -> TracerProvider:
    """The app's SDK tracer provider, or a new one made global if the app has none."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider
    created = TracerProvider(resource=Resource.create())
    trace.set_tracer_provider(created)
    if trace.get_tracer_provider() is not created:  # another SDK-like provider won the race
        logger.warning("genai-mlflow: the global tracer provider is not the SDK's; spans go to a private one")
    return created


@dataclass
class Handle:
    """What ``instrument()`` returns: flush and shut down the pipeline it set up."""

    pipeline: Pipeline | None
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Settings | None:
        return self.pipeline.settings if self.pipeline else None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """True once every LLM call ended so far has landed in MLflow; False at the timeout."""
        if self.pipeline is None:
            return True
        try:
            return self.pipeline.flush(timeout_s)
        except Exception:
            logger.exception("genai-mlflow could not flush")
            return False

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        with _lock:
            if _current.handle is self:
                _current.handle = None
        if self.pipeline is None:
            return True
        OpenAIInstrumentor().uninstrument()
        try:
            return self.pipeline.shutdown(timeout_s)
        except Exception:
            logger.exception("genai-mlflow could not shut down cleanly")
            return False


def instrument(
    tracking_uri: str | None = None,
    *,
    mode: str | None = None,
    capture_content: bool | None = None,
    redact: Any = None,
    **options: Any,
) -> Handle:
    """One line: instrument OpenAI and send every call to MLflow. Idempotent."""
    arguments = {
        "tracking_uri": tracking_uri,
        "mode": mode,
        "capture_content": capture_content,
        "redact": redact,
        **options,
    }
    with _lock:
        current = _current.handle
        if current is not None:
            if arguments != current.arguments:
                logger.warning(
                    "genai_mlflow.instrument() was called before with other arguments; these are ignored"
                )
            return current
        if is_disabled():
            logger.info("genai-mlflow is disabled by GENAI_MLFLOW_DISABLED")
            _current.handle = Handle(None, arguments)
            return _current.handle
        settings = Settings.resolve(tracking_uri, mode=mode, **options)
        provider = sdk_tracer_provider()
        pipeline = get_pipeline(settings)
        attach(pipeline, provider)
        instrumentor = OpenAIInstrumentor()
        if instrumentor.is_instrumented_by_opentelemetry:  # the launcher did it, or the app itself
            instrumentor.uninstrument()
        instrumentor.instrument(
            tracer_provider=provider,
            capture_content=resolve_capture_content(capture_content, default=True),
            redact=redact,
            max_value_bytes=settings.max_value_bytes,
            app_version=settings.app_version,
        )
        _current.handle = Handle(pipeline, arguments)
        return _current.handle


def current_handle() -> Handle | None:
    return _current.handle


def _shutdown_all() -> None:
    with _lock:
        pipelines = list(_pipelines.values())
    for pipeline in pipelines:
        try:
            pipeline.shutdown(timeout_s=5.0)
        except Exception:
            logger.exception("genai-mlflow could not shut down at exit")


def _after_fork_in_child() -> None:
    for pipeline in _pipelines.values():
        if not pipeline.closed:
            try:
                pipeline.restart_writer_after_fork()
            except Exception:
                logger.exception("genai-mlflow could not start a writer in a forked child")


atexit.register(_shutdown_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
