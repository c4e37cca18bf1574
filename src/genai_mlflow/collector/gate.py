"""Which spans the collector writes: every span of a trace that has a GenAI span, and no other.

A service sends all its spans (web requests, database calls), and a GenAI trace's spans arrive in
several export requests: the LLM span first (it ends first), its parents later, and sometimes
siblings that ended before it earlier still. So:

- a trace with a GenAI span in a request becomes *known*, until its local root has come (the last
  of its spans to end) or for ``known_ttl_s``; its spans, and the spans of known traces in later
  requests, are written. A local root whose parent is remote means other services take part: the
  trace stays known ``passed_ttl_s`` longer, for the callers' spans, which end after it;
- the spans of a trace not known yet are *held* in memory, serialised, for up to ``held_ttl_s``:
  written with the trace's first GenAI span, or discarded (``no_genai``) when the time is up.
  Held spans are bounded by ``held_max_bytes``; past it the oldest traces are discarded
  (``held_overflow``).

Routing by trace id (the upstream collector's ``loadbalancing`` exporter) sends every span of a
trace to one replica, which is what makes this work across replicas. Held spans are not durable:
they are the context around an LLM call, never the call itself, which is spooled at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from genai_mlflow.exporter import records

HELD_MAX_BYTES = 32 << 20
HELD_TTL_S = 300.0  # as long as the writer waits for a trace's local root
KNOWN_MAX = 100_000
KNOWN_TTL_S = 3600.0
PASSED_TTL_S = 30.0  # after a local root with a remote parent: the callers' parts end later


@dataclass(frozen=True)
class Entry:
    """A span with its resource and scope (each a serialised ``ResourceSpans`` / ``ScopeSpans``
    without their children), as the parsed span or, once held, its serialised bytes."""

    resource: bytes
    scope: bytes
    span: Span | bytes

    @property
    def size(self) -> int:
        span = self.span
        return (
            len(self.resource) + len(self.scope) + (len(span) if isinstance(span, bytes) else span.ByteSize())
        )


@dataclass
class Admitted:
    write: list[Entry] = field(default_factory=list)  # this request's spans and released held ones
    released: int = 0  # held spans among ``write``
    held: int = 0  # spans of this request now held
    discarded: Counter[str] = field(default_factory=Counter)  # by reason, any request's


@dataclass
class _Held:
    entries: list[Entry]
    size: int
    since: float


class TraceGate:
    def __init__(
        self,
        *,
        held_max_bytes: int = HELD_MAX_BYTES,
        held_ttl_s: float = HELD_TTL_S,
        known_max: int = KNOWN_MAX,
        known_ttl_s: float = KNOWN_TTL_S,
        passed_ttl_s: float = PASSED_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._held_max_bytes = held_max_bytes
        self._held_ttl_s = held_ttl_s
        self._known_max = known_max
        self._known_ttl_s = known_ttl_s
        self._passed_ttl_s = passed_ttl_s
        self._clock = clock
        self._known: OrderedDict[bytes, float] = OrderedDict()  # trace id -> last seen
        # Known traces whose local root had a remote parent: trace id -> when it came.
        self._passed: OrderedDict[bytes, float] = OrderedDict()
        self._held: OrderedDict[bytes, _Held] = OrderedDict()  # trace id -> spans, oldest first
        self._held_bytes = 0
        self._held_spans = 0
        self._lock = threading.Lock()

    @property
    def held_spans(self) -> int:
        return self._held_spans

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def admit(self, traces: Mapping[bytes, list[Entry]], genai: Iterable[bytes]) -> Admitted:
        """Decide for one request's spans, grouped by trace id; ``genai`` are the trace ids with a
        GenAI span in this request."""
        out = Admitted()
        with self._lock:
            now = self._clock()
            self._expire(now, out.discarded)
            for trace_id in genai:
                self._remember(trace_id, now)
            for trace_id, entries in traces.items():
                if trace_id in self._known or trace_id in self._passed:
                    if trace_id in self._known:
                        self._known[trace_id] = now
                        self._known.move_to_end(trace_id)
                    held = self._held.pop(trace_id, None)
                    if held is not None:
                        self._held_bytes -= held.size
                        self._held_spans -= len(held.entries)
                        out.write.extend(held.entries)
                        out.released += len(held.entries)
                    out.write.extend(entries)
                    roots = [
                        e.span for e in entries if isinstance(e.span, Span) and records.is_local_root(e.span)
                    ]
                    if roots:
                        # Its last span has come. Remembering it for the TTL instead grew memory
                        # with throughput, by ~150 bytes a trace.
                        self._known.pop(trace_id, None)
                        if all(records.has_parent(root) for root in roots):  # callers elsewhere
                            self._passed[trace_id] = now
                            self._passed.move_to_end(trace_id)
                            while len(self._passed) > self._known_max:
                                self._passed.popitem(last=False)
                        else:  # the trace's own root
                            self._passed.pop(trace_id, None)
                else:
                    self._hold(trace_id, entries, now)
                    out.held += len(entries)
            self._bound(out.discarded)
        return out

    def discard_all(self) -> int:
        """Drop every held span (at shutdown); how many there were."""
        with self._lock:
            count = self._held_spans
            self._held.clear()
            self._held_bytes = self._held_spans = 0
            return count

    def _remember(self, trace_id: bytes, now: float) -> None:
        self._known[trace_id] = now
        self._known.move_to_end(trace_id)
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)

    def _hold(self, trace_id: bytes, entries: list[Entry], now: float) -> None:
        # Serialised: a parsed span would keep its whole request alive in memory.
        kept = [
            e if isinstance(e.span, bytes) else Entry(e.resource, e.scope, e.span.SerializeToString())
            for e in entries
        ]
        size = sum(e.size for e in kept)
        held = self._held.get(trace_id)
        if held is None:
            self._held[trace_id] = _Held(kept, size, now)
        else:
            held.entries.extend(kept)
            held.size += size
        self._held_bytes += size
        self._held_spans += len(kept)

    def _expire(self, now: float, discarded: Counter[str]) -> None:
        while self._known:
            trace_id, seen = next(iter(self._known.items()))
            if now - seen <= self._known_ttl_s:
                break
            del self._known[trace_id]
        while self._passed:
            trace_id, passed = next(iter(self._passed.items()))
            if now - passed <= self._passed_ttl_s:
                break
            del self._passed[trace_id]
        while self._held:
            trace_id, held = next(iter(self._held.items()))
            if now - held.since <= self._held_ttl_s:
                break
            self._drop_oldest(discarded, "no_genai")

    def _bound(self, discarded: Counter[str]) -> None:
        while self._held and self._held_bytes > self._held_max_bytes:
            self._drop_oldest(discarded, "held_overflow")

    def _drop_oldest(self, discarded: Counter[str], reason: str) -> None:
        _, held = self._held.popitem(last=False)
        self._held_bytes -= held.size
        self._held_spans -= len(held.entries)
        discarded[reason] += len(held.entries)
