"""Finishing LLM spans off the caller's thread.

A call that ends hands its span, its timings and the objects it read to one daemon thread, which
builds the attributes (content JSON included), records the metrics and ends the span with the end
time the caller saw. The caller pays a queue append; the rest runs while the app waits on I/O or
sleeps. It is on where something drains it at flush and at exit: genai-mlflow's own pipeline
(``genai_mlflow.instrument()`` and the launcher's distro). Elsewhere spans end inline, as every
OpenTelemetry user expects of an instrumentor.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from collections.abc import Callable

from genai_mlflow.throttle import Throttle

logger = logging.getLogger("genai_mlflow.instrumentation")

# Past this many calls waiting, callers finish their own spans: slower, but nothing is lost and
# memory stays bounded when calls come faster than one thread can finish them.
MAX_WAITING = 10_000
AT_EXIT_TIMEOUT_S = 5.0

Task = Callable[[], None]


class Finisher:
    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self._max_waiting = max_waiting
        self._queue: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()
        self.enabled = False  # set by the pipeline that drains it
        self.inline_overflows = 0  # tasks run by their caller because the queue was full
        self._overflow_log = Throttle(60.0)

    def submit(self, task: Task) -> None:
        """Run ``task`` on the finishing thread, or here if that is off or overloaded."""
        if self.enabled:
            if self._queue.qsize() < self._max_waiting:
                try:
                    if self._pid != os.getpid():
                        self._start()
                    self._queue.put(task)
                    return
                except Exception:  # no thread to be had (e.g. at interpreter exit): finish here
                    logger.debug("genai-mlflow finishes a span inline", exc_info=True)
            else:
                self.inline_overflows += 1
                if self._overflow_log.ready():
                    logger.warning(
                        "genai-mlflow: %d LLM calls wait to be finished; callers finish their own "
                        "spans until it catches up (%d so far)",
                        self._max_waiting,
                        self.inline_overflows,
                    )
        _run(task)

    def flush(self, timeout_s: float) -> bool:
        """True once every task submitted before this call has run."""
        if self._thread is None or self._pid != os.getpid():
            return True
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout_s)

    def _start(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            # In a forked child the parent's thread is gone and its queued tasks are the parent's
            # to finish: start over.
            first = self._pid == 0
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._work, name="genai-mlflow-finisher", daemon=True)
            self._thread.start()
            self._pid = os.getpid()
            if first:
                # Registered after the tracer provider's own handler, so it runs before it.
                atexit.register(self.flush, AT_EXIT_TIMEOUT_S)

    def _work(self) -> None:
        tasks = self._queue
        while True:
            _run(tasks.get())


def _run(task: Task) -> None:
    try:
        task()
    except Exception:  # never into the app, never the end of the thread
        logger.exception("genai-mlflow could not finish an LLM span")


FINISHER = Finisher()
