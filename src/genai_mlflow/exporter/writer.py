"""The writer: drains the spool into MLflow, in parallel, retried, behind a circuit breaker.

One drain thread reads records, merges the spans of each trace, and hands complete traces to a pool
of workers that land them (mode ``call``: one run and one linked trace per local trace; mode
``window``: metric steps on an hourly run per persona and model, and batched traces). A record is
committed in the spool only once every trace in it has landed, so a crash or an outage replays it;
the ledger and MLflow's upsert of traces by id make a replay land nothing twice.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import queue
import random
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from genai_mlflow import semconv as sc
from genai_mlflow.throttle import Throttle

from . import records
from .gateway import Gateway, GatewayError
from .links import Links
from .pricing import PriceTable
from .records import LocalTrace, WindowPoint
from .spool import Record, RecordId, Spool

logger = logging.getLogger("genai_mlflow.exporter")

# An incomplete trace from a live process waits this long for its local root before landing as is.
ORPHAN_AFTER_S = 300.0
LOCK_RETRY_S = 2.0  # how often a standby writer checks whether the draining one went away
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 60.0
WINDOW_GRACE_S = 300.0
# What the writer holds in memory at most, ahead of what has landed; the rest waits in the spool.
MAX_PENDING_BYTES = 32 << 20  # spool payload of the records read and not yet committed
MAX_PENDING_TRACES = 20_000  # a second bound, as a record's traces can cost more than its payload
READ_BATCH = 1000  # records per spool read at most
MAX_TRACES_PER_REQUEST = 100  # MLflow links no trace at all past 100 roots in one request
# Mode window: batches (each at most one full OTLP request per window) landing at once. The server
# handles requests in parallel; more in flight only queue there and make the batches smaller.
WINDOW_BATCHES_IN_FLIGHT = 3
# Mode window: how long a batch short of a full request waits for more traces (unless a flush()
# waits). Each request costs the server about as much as two more traces in it.
WINDOW_LINGER_S = 0.5
_CIRCUIT_OPEN = "circuit open: MLflow failed recently; waiting before the next try"
# A trace given up on (wrong credentials, no permission) is logged at most once per this long: with
# wrong credentials every call fails the same way.
GIVEN_UP_LOG_S = 60.0
LATE_LOG_S = 60.0
_UNAUTHENTICATED = re.compile(r"answered 401\b|UNAUTHENTICATED")
_DENIED = re.compile(r"answered 403\b|PERMISSION_DENIED")
_CREDENTIALS = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"


class CircuitBreaker:
    """Open after consecutive failures; half-open after a cooldown that doubles, with jitter."""

    def __init__(self, threshold: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = threshold
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        return self._clock() >= self._open_until

    def half_open(self) -> bool:
        """Past its cooldown but not yet closed: a probe finds out whether MLflow is back."""
        return self._failures >= self._threshold and self.allow()

    def success(self) -> bool:
        """True if this closes a circuit that had opened: MLflow is back."""
        with self._lock:
            recovered = self._failures >= self._threshold
            if recovered:
                logger.warning("genai-mlflow: MLflow is reachable again; replaying the spool")
            self._failures = 0
            self._open_until = 0.0
            return recovered

    def failure(self, error: Exception) -> None:
        with self._lock:
            if self._clock() < self._open_until:
                # Already open: the other requests that were in flight, or let through together
                # when it half-opened, count as one failure, so the cooldown doubles per round
                # rather than per request (which pushed it to its 60 s cap in seconds).
                return
            self._failures += 1
            if self._failures < self._threshold:
                return
            cooldown = backoff(self._failures - self._threshold)
            self._open_until = self._clock() + cooldown
            if self._failures == self._threshold:
                logger.warning(
                    "genai-mlflow cannot write to MLflow (%s); spans stay in the spool and are retried", error
                )


def backoff(attempt: int) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2**attempt)))


class DaemonPool:
    """A fixed pool of daemon threads. Unlike ``ThreadPoolExecutor``'s workers, these never hold
    up the interpreter's exit while an MLflow request hangs: the spool keeps what did not land."""

    def __init__(self, workers: int) -> None:
        self._tasks: queue.SimpleQueue[
            tuple[Future[None], Callable[..., None], tuple[object, ...]] | None
        ] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"genai-mlflow-writer-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., None], *args: object) -> Future[None]:
        future: Future[None] = Future()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)


@dataclass(eq=False)
class _Pending:
    """A trace being assembled from spool records, or waiting for a retry."""

    trace: LocalTrace
    records: set[RecordId] = field(default_factory=set)
    replayed: bool = True  # every record it came from was written by a process now gone
    complete: bool = False  # its local root is here; kept, as finding the root walks every span
    landed_before: bool = False  # the ledger had it when its first fresh record came
    last_seen: float = 0.0
    attempts: int = 0
    not_before: float = 0.0
    in_flight: bool = False
    queued: bool = False  # in the writer's ready queue
    queued_at: float = 0.0
    due: float | None = None  # when its live entry in the writer's timer heap fires


class Writer:
    def __init__(
        self,
        spool: Spool,
        gateway: Gateway,
        prices: PriceTable,
        *,
        mode: str = "call",
        workers: int = 8,
        content_bound: int = 16 * 1024,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        settle_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``settle_s``: how long a whole trace waits after its last part came, for parts that
        other processes send (a collector); none in an app, whose processor writes a trace whole."""
        self._spool = spool
        self._gateway = gateway
        self._prices = prices
        self._mode = mode
        self._content_bound = content_bound
        self._max_pending_bytes = max_pending_bytes
        self._clock = clock
        self._settle_s = settle_s
        self._links = Links(gateway)
        # A REST gateway keeps a connection per worker: none waits for one, none is thrown away.
        reserve_connections = getattr(gateway, "reserve_connections", None)
        if reserve_connections is not None:
            reserve_connections(workers)
        self._pool = DaemonPool(workers)
        self._breaker = CircuitBreaker(clock=clock)
        self._pending: dict[bytes, _Pending] = {}
        self._record_refs: dict[RecordId, int] = {}
        self._record_bytes: dict[RecordId, int] = {}  # payload size of each record read, until committed
        self._pending_bytes = 0  # their sum: what the read-ahead bound counts
        self._largest_record = 0  # payload bytes; sizes the reads so that the bound holds per record
        # What the dispatcher looks at, so that a wake costs what is due rather than what is pending:
        # traces that can go now, and (due, sequence, trace id) for those in a backoff or waiting
        # for their local root. An entry whose due is no longer its trace's ``due`` is stale; it
        # holds the id only, so that a trace that has landed is not kept in memory until then.
        self._ready: deque[_Pending] = deque()
        self._timers: list[tuple[float, int, bytes]] = []
        self._timer_seq = itertools.count()
        self._owed: set[bytes] = set()  # trace ids that flush() waits for (see _is_owed)
        self._given_up: set[bytes] = set()  # trace ids kept in the spool after an error no retry fixes
        self._window_batches = 0  # mode window: batches in flight
        # Half-open breaker: the one trace (mode call) or batch (mode window) that is finding out
        # whether MLflow is back; the rest waits for its answer rather than failing together.
        self._probe: list[_Pending] | None = None
        self._given_up_log = Throttle(GIVEN_UP_LOG_S)
        self._given_up_unlogged = 0  # traces given up since the last line that said so
        self._late_log = Throttle(LATE_LOG_S)
        self._late_unlogged = [0, 0]  # spans and LLM calls dropped as late since the last line
        self._flushes = 0  # flush() calls waiting: what is ready goes now, in batches full or not
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._windows = _Windows(gateway, spool, self._links)
        self._draining = False  # holds the spool's drain lock
        self._standby_s = 0.0
        self._backlog = False  # records left unread in the spool by the last drain cycle
        self._reads = 0  # drain cycles completed; flush waits for one that began after it
        self.landed = 0
        self.failed = 0
        self.late_spans = 0  # spans that came after their trace had landed: dropped

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, standby_s: float = 0.0) -> None:
        """Start the drain thread. It drains once it holds the spool's drain lock: after
        ``standby_s``, at once if it is free, or when the process that holds it (another app
        process, a writer process) goes away."""
        self._standby_s = standby_s
        self._thread = threading.Thread(target=self._run, name="genai-mlflow-drain", daemon=True)
        self._thread.start()

    @property
    def draining(self) -> bool:
        """Whether this writer holds the spool's drain lock (rather than standing by)."""
        return self._draining

    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """True once every complete trace spooled so far has landed; False at the timeout, or as
        soon as the rest has landed if a trace was given up (an error a retry cannot fix)."""
        deadline = time.monotonic() + timeout_s
        # Looked at on every pass, not once: just after start(), or on a busy machine, the drain
        # thread may not have tried the drain lock yet, and a standby writer may take it over.
        while not self._draining:  # another process drains, or none yet: wait for the spool to empty
            if self._spool.status().pending_records == 0:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, 0.05))
        with self._lock:
            target = self._reads
            self._flushes += 1
            if self._settle_s:
                now = self._clock()
                for pending in self._pending.values():
                    if pending.complete:
                        self._schedule(pending, now)  # settling traces go now
        try:
            # Wake the drain thread once: waking it on every pass of this loop made it and the
            # drain thread (which notifies _idle after each cycle) spin a CPU for the whole flush.
            self._wake.set()
            while True:
                with self._idle:
                    if self._drained(target):
                        # A trace given up on (e.g. MLflow answered 401) has not landed: say so now.
                        return not self._given_up
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._idle.wait(min(remaining, 0.1))
        finally:
            with self._lock:
                self._flushes -= 1

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        # A writer meant to drain (no standby) flushes even if its thread has not taken the drain
        # lock yet; one standing by for a writer process leaves the spool to that process.
        flushed = self.flush(timeout_s) if self._draining or not self._standby_s else True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
            self._thread = None
        self._pool.shutdown()
        if self._draining:
            self._draining = False
            self._spool.release_drain_lock()
        return flushed

    # --- draining ----------------------------------------------------------------------------

    def _drained(self, target: int) -> bool:
        # Caller holds the lock: a drain cycle began after the flush, and nothing landable is owed.
        return self._reads > target + 1 and not self._backlog and not self._owed

    @staticmethod
    def _is_owed(pending: _Pending) -> bool:
        if pending.not_before == float("inf"):  # given up: logged, kept in the spool
            return False
        return pending.in_flight or pending.replayed or pending.complete

    def _note(self, pending: _Pending) -> None:
        """Keep ``_owed`` in step with a trace whose state changed. Caller holds the lock."""
        trace_id = pending.trace.trace_id
        if self._pending.get(trace_id) is pending and self._is_owed(pending):
            self._owed.add(trace_id)
        else:
            self._owed.discard(trace_id)

    def _run(self) -> None:
        self._stop.wait(self._standby_s)
        while not self._stop.is_set() and not self._draining:
            if self._spool.acquire_drain_lock():
                self._draining = True
            else:
                self._stop.wait(LOCK_RETRY_S)
        while not self._stop.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            try:
                self._drain_once()
            except Exception:
                logger.exception("genai-mlflow's writer hit an unexpected error; it carries on")
                time.sleep(0.5)

    def _drain_once(self) -> None:
        backlog = self._read_ahead()
        with self._lock:
            self._backlog = backlog
            self._reads += 1
        self._dispatch()
        if self._mode == "window" and self._breaker.allow() and not self._breaker.half_open():
            self._windows.end_past_windows()
        with self._idle:
            self._idle.notify_all()

    def _read_ahead(self) -> bool:
        """Read what the bounds leave room for; True if the spool may hold more (a backlog).

        The bounds hold per record: a record read cannot be put back, so each read asks for no more
        records than fit if none is larger than the largest seen so far, and one when near the bound.
        """
        if not self._breaker.allow():
            return True  # MLflow is down: the backlog is safe on disk, and reading it only costs memory
        while True:
            with self._lock:
                room = self._max_pending_bytes - self._pending_bytes
                traces_room = MAX_PENDING_TRACES - len(self._pending)
                largest = self._largest_record
            if room <= 0 or traces_room <= 0:
                return True
            # One record first: nothing says how large they are yet.
            count = min(READ_BATCH, traces_room, max(1, room // largest) if largest else 1)
            batch = self._spool.read(count)
            if batch:
                self._ingest(batch)
            if len(batch) < count:
                return False

    def _ingest(self, batch: list[Record]) -> None:
        now = self._clock()
        empty: list[RecordId] = []
        with self._lock:
            for record in batch:
                self._largest_record = max(self._largest_record, len(record.payload))
                try:
                    request = ExportTraceServiceRequest.FromString(record.payload)
                    traces = records.local_traces(request)
                except Exception:
                    logger.exception("genai-mlflow skipped an unreadable spool record %s", record.id)
                    empty.append(record.id)
                    continue
                if not traces:
                    empty.append(record.id)
                    continue
                self._record_bytes[record.id] = len(record.payload)
                self._pending_bytes += len(record.payload)
                for trace in traces:
                    pending = self._pending.get(trace.trace_id)
                    if pending is None:
                        pending = self._pending[trace.trace_id] = _Pending(trace)
                        # Fresh spans of a trace that has landed (not a replay): they go at once, to
                        # be counted and logged as dropped, rather than wait for a root that landed.
                        pending.landed_before = (
                            not record.replayed
                            and self._spool.ledger_get("trace:" + trace.trace_id.hex()) is not None
                        )
                    else:
                        pending.trace = records.merge([pending.trace, trace])[0]
                    pending.records.add(record.id)
                    pending.replayed = pending.replayed and record.replayed
                    pending.complete = pending.landed_before or records.is_complete(pending.trace)
                    pending.last_seen = now
                    self._record_refs[record.id] = self._record_refs.get(record.id, 0) + 1
                    self._schedule(pending, now)
                    self._note(pending)
        if empty:
            self._spool.commit(empty)

    def _schedule(self, pending: _Pending, now: float) -> None:
        """Queue a trace that can go now; else give it a timer for when it may (the end of its
        backoff, or when it counts as an orphan). Caller holds the lock."""
        if pending.in_flight or pending.queued or pending.not_before == float("inf"):
            return
        if now < pending.not_before:
            due = pending.not_before
        elif pending.replayed or pending.landed_before:
            due = now
        elif pending.complete:
            # Other services' parts of the trace land with it if they come within settle_s of
            # the last part; flush() does not wait for them.
            due = now if self._flushes else pending.last_seen + self._settle_s
        else:
            due = pending.last_seen + ORPHAN_AFTER_S
        if due <= now:
            pending.queued = True
            pending.queued_at = now
            pending.due = None  # any entry it has in the heap is stale now
            self._ready.append(pending)
        elif pending.due is None or due < pending.due:
            # A later due (new spans moved last_seen on) waits: its earlier entry reschedules it.
            pending.due = due
            heapq.heappush(self._timers, (due, next(self._timer_seq), pending.trace.trace_id))

    def _fire_timers(self, now: float) -> None:
        # Caller holds the lock.
        while self._timers and self._timers[0][0] <= now:
            due, _, trace_id = heapq.heappop(self._timers)
            pending = self._pending.get(trace_id)
            if pending is None or pending.due != due:
                continue  # stale: it was queued, rescheduled earlier, or has landed
            pending.due = None
            self._schedule(pending, now)

    def _take(self, limit: int) -> list[_Pending]:
        """Up to ``limit`` traces off the ready queue, marked in flight. Caller holds the lock."""
        taken: list[_Pending] = []
        while self._ready and len(taken) < limit:
            pending = self._ready.popleft()
            pending.queued = False
            pending.in_flight = True
            self._note(pending)
            taken.append(pending)
        return taken

    def _dispatch(self) -> None:
        if not self._breaker.allow():
            return
        # Half-open: one trace (one batch in mode window) finds out whether MLflow is back, rather
        # than the whole backlog failing together; the rest goes once it has landed.
        probing = self._breaker.half_open()
        batches: list[list[_Pending]] = []
        with self._lock:
            now = self._clock()
            self._fire_timers(now)
            if probing and self._probe is not None:
                return
            if self._mode == "window":
                # Each window's calls become one log_batch and few trace requests per batch; a few
                # batches land at once, their steps and sums reserved in order (see _Windows).
                while (
                    self._ready
                    and self._window_batches < WINDOW_BATCHES_IN_FLIGHT
                    and not (probing and batches)
                    and (
                        len(self._ready) >= MAX_TRACES_PER_REQUEST
                        or self._flushes
                        or now - self._ready[0].queued_at >= WINDOW_LINGER_S
                    )
                ):
                    batches.append(self._take(MAX_TRACES_PER_REQUEST))
                    self._window_batches += 1
            else:
                batches = [[pending] for pending in self._take(1 if probing else len(self._ready))]
            if probing and batches:
                self._probe = batches[0]
        for batch in batches:
            if self._mode == "window":
                future = self._pool.submit(self._land_window, batch)
                future.add_done_callback(functools.partial(self._landed_window, batch))
            else:
                future = self._pool.submit(self._land_call, batch[0])
                future.add_done_callback(functools.partial(self._landed, batch))

    def _land_call(self, pending: _Pending) -> None:
        if not self._breaker.allow():
            raise GatewayError(_CIRCUIT_OPEN)
        wrote = land_call(self._gateway, self._spool, self._prices, pending, self._content_bound, self._links)
        if not wrote and not pending.replayed:
            self._drop_late([pending.trace])

    def _land_window(self, batch: list[_Pending]) -> None:
        if not self._breaker.allow():
            raise GatewayError(_CIRCUIT_OPEN)
        landed_before = self._windows.write([p.trace for p in batch], self._prices, self._content_bound)
        replayed = {p.trace.trace_id for p in batch if p.replayed}
        self._drop_late([t for t in landed_before if t.trace_id not in replayed])

    def _drop_late(self, traces: list[LocalTrace]) -> None:
        """Count and log spans that ended after their trace had landed. A replayed record of a
        landed trace is no news (the crash came between landing and committing it); a fresh one is."""
        if not traces:
            return
        spans = sum(len(t.spans) for t in traces)
        calls = sum(len(t.llm_spans) for t in traces)
        with self._lock:
            self.late_spans += spans
            self._late_unlogged[0] += spans
            self._late_unlogged[1] += calls
            if not self._late_log.ready():
                return
            (spans, calls), self._late_unlogged = self._late_unlogged, [0, 0]
        logger.warning(
            "genai-mlflow dropped %d span(s), %d of them LLM call(s), that came after their trace had "
            "landed in MLflow (trace %s%s): a landed trace is not amended. They are calls made after "
            "their request ended (a task it left behind: give it a root span of its own and it lands "
            "as its own run) or, through a collector, another service's part of the trace.",
            spans,
            calls,
            traces[0].trace_id.hex(),
            f" and {len(traces) - 1} more" if len(traces) > 1 else "",
        )

    def _landed_window(self, batch: list[_Pending], future: Future[None]) -> None:
        with self._lock:
            self._window_batches -= 1
        self._landed(batch, future)

    def _landed(self, batch: list[_Pending], future: Future[None]) -> None:
        try:
            self._settle(batch, future)
        finally:
            if self._probe is batch:  # the breaker has the probe's answer now: the rest may go
                with self._lock:
                    self._probe = None
                self._wake.set()

    def _settle(self, batch: list[_Pending], future: Future[None]) -> None:
        now = self._clock()
        if future.cancelled():  # shutdown() cancelled it before it ran: it stays in the spool
            with self._lock:
                for pending in batch:
                    pending.in_flight = False
                    self._schedule(pending, now)
                    self._note(pending)
            return
        error = future.exception()
        done: list[RecordId] = []
        with self._lock:
            for pending in batch:
                pending.in_flight = False
                if error is None:
                    self._pending.pop(pending.trace.trace_id, None)
                    self._note(pending)
                    self.landed += 1
                    for record_id in pending.records:
                        left = self._record_refs.get(record_id, 1) - 1
                        if left <= 0:
                            self._record_refs.pop(record_id, None)
                            self._pending_bytes -= self._record_bytes.pop(record_id, 0)
                            done.append(record_id)
                        else:
                            self._record_refs[record_id] = left
                    continue
                if isinstance(error, GatewayError) and not error.retryable:
                    self.failed += 1
                    pending.not_before = float("inf")  # kept in the spool for `genai-mlflow spool replay`
                    self._given_up.add(pending.trace.trace_id)
                else:
                    pending.attempts += 1
                    pending.not_before = now + backoff(pending.attempts)
                self._schedule(pending, now)
                self._note(pending)
            # Wake the drain thread only when it has something to do: a window batch's place is
            # free for what waits, a flush() may wait for one more drain cycle, or the read-ahead
            # stopped at its bound has room again.
            wake = bool(self._ready) or not self._owed or (self._backlog and bool(done))
            if not self._owed:
                self._idle.notify_all()
        if error is None:
            if self._breaker.success():
                # MLflow is back: what waited out the outage goes now, not after its own backoff.
                with self._lock:
                    for waiting in self._pending.values():
                        if waiting.not_before != float("inf"):
                            waiting.not_before = 0.0
                            self._schedule(waiting, now)
                wake = True
            self._spool.commit(done)
        elif isinstance(error, GatewayError) and not error.retryable:
            self._log_given_up(batch, error)
        elif not (isinstance(error, GatewayError) and str(error) == _CIRCUIT_OPEN):
            self._breaker.failure(error)  # type: ignore[arg-type]  # one failed request, whatever its size
            for pending in batch:
                logger.debug("genai-mlflow will retry trace %s: %s", pending.trace.trace_id.hex(), error)
        if wake:
            self._wake.set()

    def _log_given_up(self, batch: list[_Pending], error: GatewayError) -> None:
        with self._lock:
            self._given_up_unlogged += len(batch)
            if not self._given_up_log.ready():
                return
            unlogged, self._given_up_unlogged = self._given_up_unlogged, 0
        message = str(error).rstrip(". ")
        hint = ""
        if _DENIED.search(message):
            hint = " The user may not write there: grant it permission, or use other credentials"
            hint += f" ({_CREDENTIALS});"
        elif _UNAUTHENTICATED.search(message):
            hint = f" Check {_CREDENTIALS};"
        if hint:
            hint += " `genai-mlflow doctor` diagnoses it."
        others = unlogged - 1
        logger.error(
            "genai-mlflow could not land trace %s in MLflow at %s and will not retry: %s.%s It stays in "
            "the spool for `genai-mlflow spool replay`%s.",
            batch[0].trace.trace_id.hex(),
            _without_credentials(self._gateway.tracking_uri),
            message,
            hint,
            f"; {others} more trace(s) given up since the last such message" if others else "",
        )


def _without_credentials(uri: str) -> str:
    """The URI for a log line: a user and password in it (a database URI) stay out of logs."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


RUN_STATE_CREATED = "created"
RUN_STATE_DONE = "done"


def land_call(
    gateway: Gateway,
    spool: Spool,
    prices: PriceTable,
    pending: _Pending,
    content_bound: int,
    links: Links,
) -> bool:
    """Mode ``call``: one run per local trace, the trace linked to it and to the prompt versions
    and app version it was made with; each step idempotent. False if the trace had landed already,
    and nothing was written."""
    trace = pending.trace
    run = records.run_record(trace, prices, links.registered)
    ledger_key = "trace:" + run.trace_id
    state = spool.ledger_get(ledger_key)
    run_id, _, step = (state or "").partition("|")
    if step == RUN_STATE_DONE:
        return False
    experiment_id = gateway.experiment_id(run.experiment_name, records.experiment_tags(run.persona, run.day))
    if not run_id and (pending.replayed or pending.attempts):
        run_id = gateway.find_run(experiment_id, sc.GENAI_MLFLOW_TRACE_ID, run.trace_id) or ""
    if not run_id:
        run_id = gateway.create_run(experiment_id, run.run_name, run.start_ms, run.tags)
        spool.ledger_put(ledger_key, f"{run_id}|{RUN_STATE_CREATED}")
    request, offloads = records.trace_request(
        [trace],
        prices,
        content_bound=content_bound,
        artifact_uri=lambda path: gateway.artifact_uri(run_id, path),
        registered=links.registered,
    )
    if offloads:
        gateway.upload(run_id, offloads)
    gateway.post_traces(experiment_id, run_id, request)
    _link(links, experiment_id, records.trace_links(trace, prices, links.registered))
    gateway.log_batch(run_id, run.params, [(k, v, run.end_ms, 0) for k, v in run.metrics.items()], {})
    gateway.end_run(run_id, run.status, run.end_ms)
    spool.ledger_put(ledger_key, f"{run_id}|{RUN_STATE_DONE}")
    return True


def _link(links: Links, experiment_id: str, trace: records.TraceLinks) -> None:
    links.link_prompts(experiment_id, trace.trace_id, trace.prompts)
    links.link_model(experiment_id, trace.trace_id, trace.app_version, trace.timing)


@dataclass(frozen=True)
class _Step:
    """One LLM call's place in its window, fixed the first time its trace is written: a retry logs
    the very same metric rows (MLflow keeps one of identical rows), and no other call's step or sum
    moves."""

    experiment_id: str
    run_id: str
    step: int
    rows: tuple[tuple[str, float, int, int], ...]  # the call's own metrics, at its step
    sums: tuple[tuple[str, float, int, int], ...]  # the window's totals with this call, at step + 1


class _Windows:
    """Mode ``window``: hourly runs per persona and model (per writer); calls become metric steps.

    Several batches land at once. Only handing out steps and running sums, in order, holds the lock
    (and making a window's run, once an hour); the requests go out without it. The ``*_sum``
    value MLflow shows is the one at the highest step, so it is exact whatever order batches land in.
    """

    def __init__(self, gateway: Gateway, spool: Spool, links: Links) -> None:
        self._gateway = gateway
        self._spool = spool
        self._links = links
        self._lock = threading.Lock()
        self._runs: dict[str, tuple[str, str]] = {}  # key -> (experiment id, run id)
        self._steps: dict[str, int] = {}
        self._sums: dict[str, dict[str, float]] = {}
        self._reserved: dict[bytes, list[_Step]] = {}  # trace id -> its calls' steps, until it lands

    def write(self, traces: list[LocalTrace], prices: PriceTable, content_bound: int) -> list[LocalTrace]:
        """Land the traces that have not landed yet; return the others, untouched."""
        fresh: list[LocalTrace] = []
        landed_before: list[LocalTrace] = []
        for trace in traces:
            known = self._spool.ledger_get("trace:" + trace.trace_id.hex()) is not None
            (landed_before if known else fresh).append(trace)
        steps = self._reserve(fresh, prices)
        by_run: dict[str, tuple[str, dict[bytes, LocalTrace], list[_Step]]] = {}
        for trace in fresh:
            for step in steps[trace.trace_id]:
                _, run_traces, run_steps = by_run.setdefault(step.run_id, (step.experiment_id, {}, []))
                run_traces[trace.trace_id] = trace
                run_steps.append(step)
        for run_id, (experiment_id, run_traces, run_steps) in by_run.items():
            self._land(experiment_id, run_id, list(run_traces.values()), run_steps, prices, content_bound)
        for trace in fresh:
            self._spool.ledger_put("trace:" + trace.trace_id.hex(), RUN_STATE_DONE)
        with self._lock:
            for trace in fresh:
                self._reserved.pop(trace.trace_id, None)
        return landed_before

    def _reserve(self, traces: list[LocalTrace], prices: PriceTable) -> dict[bytes, list[_Step]]:
        """Each trace's steps: those it was given before, else the next ones of its windows."""
        points = {t.trace_id: records.window_points(t, prices) for t in traces}
        with self._lock:
            for trace in traces:
                if trace.trace_id in self._reserved:
                    continue
                trace_points = points[trace.trace_id]
                # Every run first: if making one fails, this trace has been handed nothing.
                runs = [self._run_for(point) for point in trace_points]
                self._reserved[trace.trace_id] = [
                    self._next_step(point, run) for point, run in zip(trace_points, runs, strict=True)
                ]
            return {t.trace_id: self._reserved[t.trace_id] for t in traces}

    def _next_step(self, point: WindowPoint, run: tuple[str, str]) -> _Step:
        # Caller holds the lock.
        step = self._steps.get(point.key, 0)
        sums = self._sums.setdefault(point.key, {})
        for name, value in point.metrics.items():
            sums[name] = sums.get(name, 0.0) + value
        self._steps[point.key] = step + 1
        ts = point.timestamp_ms
        totals = [(f"{name}_sum", total, ts, step + 1) for name, total in sums.items()]
        totals.append(("llm_calls_sum", float(step + 1), ts, step + 1))
        return _Step(
            experiment_id=run[0],
            run_id=run[1],
            step=step,
            rows=tuple((name, value, ts, step) for name, value in point.metrics.items()),
            sums=tuple(totals),
        )

    def _run_for(self, point: WindowPoint) -> tuple[str, str]:
        # Caller holds the lock, so that a window gets one run.
        known = self._runs.get(point.key)
        if known is not None:
            return known
        day = point.hour.date()
        experiment_id = self._gateway.experiment_id(
            records.experiment_name(point.persona, day), records.experiment_tags(point.persona, day)
        )
        run_id = self._gateway.create_run(
            experiment_id,
            f"{point.model} {point.hour:%Y-%m-%d %H}h",
            int(point.hour.timestamp() * 1000),
            {
                sc.GENAI_MLFLOW_WINDOW: point.key,
                sc.GENAI_MLFLOW_PERSONA: point.persona,
                "model": point.model,
                # The version of the window's first call (a window may span a deployment; each
                # trace carries its own).
                **({sc.GENAI_MLFLOW_APP_VERSION: point.app_version} if point.app_version else {}),
            },
        )
        self._runs[point.key] = (experiment_id, run_id)
        return experiment_id, run_id

    def _land(
        self,
        experiment_id: str,
        run_id: str,
        traces: list[LocalTrace],
        steps: list[_Step],
        prices: PriceTable,
        content_bound: int,
    ) -> None:
        registered = self._links.registered
        for start in range(0, len(traces), MAX_TRACES_PER_REQUEST):
            chunk = traces[start : start + MAX_TRACES_PER_REQUEST]
            request, offloads = records.trace_request(
                chunk,
                prices,
                content_bound=content_bound,
                artifact_uri=lambda path: self._gateway.artifact_uri(run_id, path),
                registered=registered,
            )
            if offloads:
                self._gateway.upload(run_id, offloads)
            self._gateway.post_traces(experiment_id, run_id, request)
            for trace in chunk:
                _link(self._links, experiment_id, records.trace_links(trace, prices, registered))
        metrics = [row for step in steps for row in step.rows]
        metrics.extend(max(steps, key=lambda s: s.step).sums)
        for start in range(0, len(metrics), 1000):
            self._gateway.log_batch(run_id, {}, metrics[start : start + 1000], {})

    def end_past_windows(self) -> None:
        now = datetime.now(UTC).timestamp()
        past: list[tuple[str, str, float]] = []
        with self._lock:
            for key, (_, run_id) in self._runs.items():
                hour = key.rsplit("|", 1)[-1]
                try:
                    end = datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp() + 3600
                except ValueError:
                    continue
                if now > end + WINDOW_GRACE_S:
                    past.append((key, run_id, end))
        for key, run_id, end in past:
            self._gateway.end_run(run_id, "FINISHED", int(end * 1000))
            with self._lock:
                if self._runs.get(key, ("", ""))[1] == run_id:
                    del self._runs[key]
                    self._steps.pop(key, None)
                    self._sums.pop(key, None)
