"""Per-call cost of genai-mlflow's OpenAI instrumentation, against the bare client and other instrumentations.

Run by hand (not a test)::

    .venv/bin/pip install -r benchmarks/requirements.txt         # the instrumentations compared with
    .venv/bin/python benchmarks/bench_instrumentor.py            # full run, about 3-4 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_instrumentor.py --quick    # a few small blocks, for a smoke check
    .venv/bin/python benchmarks/bench_instrumentor.py --only "SDK floor"  # exact label, else label prefix
    .venv/bin/python benchmarks/bench_instrumentor.py --profile  # cProfile of genai-mlflow's wrapper

The real ``openai`` client talks to an in-process transport (``MockTransport`` of the httpx flavour the
client is built on: ``httpx2`` for openai 3.x, ``httpx`` for 1.x and 2.x) that returns a fixed, realistic
chat completion, or a fixed SSE body of 200 content chunks plus a usage chunk. No network is used.

Contenders, content capture on for each:

- genai-mlflow: its ``OpenAIInstrumentor`` as ``genai_mlflow.instrument()`` and the
  ``opentelemetry-instrument`` launcher run it, spans finished on a background thread
  (``FINISHER.enabled``);
- genai-mlflow inline: the same instrumentor on its own, spans finished on the caller's thread;
- official (``opentelemetry-instrumentation-genai-openai``, or the older ``-openai-v2``) and Traceloop
  (``opentelemetry-instrumentation-openai``), when installed;
- SDK floor: the OpenTelemetry SDK span and the three GenAI histogram records alone, attributes
  precomputed: the least any SDK-based instrumentation emitting these signals can cost; not an
  instrumentation. Defined here (``SdkFloor``) for plain calls only.

Method: machine drift (frequency scaling, noisy neighbours) is cancelled by alternating, in one process,
a block of bare calls and a block of instrumented calls, instrumenting and uninstrumenting between
blocks. Each pair of adjacent blocks gives one instrumented/bare ratio and one difference per clock;
the medians over pairs are reported. The order inside a pair flips every round, and the contenders
take turns round-robin, so drift spreads evenly over all of them. Every block is timed on two CPU
clocks read together, which other processes disturb less than wall-clock time:

- caller: CPU time of the thread making the calls (``time.thread_time_ns``), what the app's own
  thread pays. The goal (ratio <= 1.05) applies to this one.
- process: CPU time of the whole process (``time.process_time_ns``), all the work, background threads
  included. Before the clocks are read, a block waits for its contender's background work
  (``Contender.settle``: genai-mlflow's finisher); the span processor's export thread is not waited
  for, and its (small) work lands in whichever block runs when it wakes.

Before timing, every contender is checked to make spans (one per call, counted by the exporter), to
capture content, and to leave the client bare after ``uninstrument()``; one that cannot be measured is
shown as ``n/a: <reason>``. Figures from a loaded machine are inflated: the output gives the load
average.
"""

from __future__ import annotations

import os

# Content capture on for every contender. Read by the official instrumentation (and by genai-mlflow,
# though it is also given capture_content=True), and by Traceloop's. Set before any of them is imported.
os.environ["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = "SPAN_ONLY"
os.environ["TRACELOOP_TRACE_CONTENT"] = "true"
# Only older official releases (opentelemetry-instrumentation-openai-v2) need this for SPAN_ONLY.
os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "gen_ai_latest_experimental")

import argparse
import cProfile
import gc
import importlib
import io
import json
import logging
import platform
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import openai
import wrapt
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry import context, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

if TYPE_CHECKING:
    from genai_mlflow.instrumentation.openai.finisher import Finisher

GOAL_RATIO = 1.05
STREAM_CHUNKS = 200
MODEL = "gpt-4o-mini"
INPUT_MARKER = "BENCH-INPUT-7f3a"
OUTPUT_MARKER = "BENCH-OUTPUT-9c1e"
FLUSH_TIMEOUT_S = 10.0

# ------------------------------------------------------------------------------------------------
# The fixed exchange


def _messages() -> list[ChatCompletionMessageParam]:
    """A realistic request: system prompt, one earlier turn, and the question."""
    return [
        {
            "role": "system",
            "content": (
                "You are a support assistant for an online bookshop. Answer in at most three short "
                "paragraphs, cite the order number when the customer gives one, never promise refunds "
                "yourself, and hand over to a human agent when the customer asks for one or is upset. "
                "Today's date is 2025-03-14 and the shop ships to the EU, the UK and Switzerland."
            ),
        },
        {"role": "user", "content": "Hi, I ordered two books last week and only one arrived."},
        {
            "role": "assistant",
            "content": "I'm sorry to hear that. Could you give me your order number so I can check?",
        },
        {
            "role": "user",
            "content": (
                f"Sure, it's 48213-B ({INPUT_MARKER}). The missing one is 'The Left Hand of Darkness'. "
                "The tracking page says both were in one parcel, but the parcel only had one book in it. "
                "Can you send the other one, or do I need to return everything first?"
            ),
        },
    ]


_ANSWER = (
    f"Thank you for the order number 48213-B ({OUTPUT_MARKER}). I can see that both books were "
    "dispatched in one parcel on 7 March, so the missing copy of 'The Left Hand of Darkness' most "
    "likely went astray at our warehouse rather than in transit.\n\nYou don't need to return anything. "
    "I've passed your case to our fulfilment team, who will send the missing book at no cost; you "
    "should receive a new tracking number by email within one working day.\n\nIf the second parcel "
    "hasn't arrived within five working days, reply to this chat and a colleague will arrange a refund "
    "for that title instead."
)
_HEADER: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "created": 1741569952,
    "model": "gpt-4o-mini-2024-07-18",
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}
_USAGE: dict[str, Any] = {
    "prompt_tokens": 187,
    "completion_tokens": 121,
    "total_tokens": 308,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def completion_body() -> bytes:
    body = {
        **_HEADER,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _ANSWER, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
    }
    return json.dumps(body).encode()


def _stream_pieces(count: int) -> list[str]:
    words = _ANSWER.split(" ")
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def stream_body(chunks: int = STREAM_CHUNKS) -> bytes:
    """SSE: a role chunk, ``chunks`` content chunks, a finish chunk, a usage chunk, then [DONE]."""

    def event(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> str:
        choices = (
            [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        )
        chunk = {**_HEADER, "object": "chat.completion.chunk", "choices": choices, "usage": usage}
        return "data: " + json.dumps(chunk) + "\n\n"

    events = [event({"role": "assistant", "content": "", "refusal": None})]
    events += [event({"content": piece}) for piece in _stream_pieces(chunks)]
    events.append(event({}, finish="stop"))
    events.append(event(None, usage=_USAGE))
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()


def httpx_module() -> Any:
    """The httpx flavour this openai is built on: ``httpx2`` (openai 3.x) or ``httpx`` (1.x, 2.x)."""
    for klass in openai.DefaultHttpxClient.__mro__:
        root = klass.__module__.split(".")[0]
        if root in ("httpx", "httpx2"):
            return importlib.import_module(root)
    raise RuntimeError(f"cannot tell which httpx openai {openai.__version__} uses")


def make_client(httpx: Any, body: bytes, content_type: str) -> openai.OpenAI:
    headers = {"content-type": content_type, "x-request-id": "req_bench", "openai-processing-ms": "412"}

    def handler(request: Any) -> Any:
        return httpx.Response(200, headers=headers, content=body)

    http_client = openai.DefaultHttpxClient(transport=httpx.MockTransport(handler))
    return openai.OpenAI(
        base_url="http://bench.local/v1", api_key="x", max_retries=0, http_client=http_client
    )


@dataclass
class Workload:
    name: str
    call: Callable[[], None]
    calls_per_block: int
    per: str  # "call" or "chunk"


def workloads(calls: int, stream_calls: int) -> tuple[Workload, Workload]:
    httpx = httpx_module()
    chat_client = make_client(httpx, completion_body(), "application/json")
    stream_client = make_client(httpx, stream_body(), "text/event-stream; charset=utf-8")
    messages = _messages()

    def chat() -> None:
        chat_client.chat.completions.create(model=MODEL, messages=messages, temperature=0.2, max_tokens=400)

    def stream() -> None:
        chunks = stream_client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0.2,
            max_tokens=400,
            stream=True,
            stream_options={"include_usage": True},
        )
        for _ in chunks:
            pass

    return (
        Workload("chat.completions.create", chat, calls, "call"),
        Workload(f"streamed, {STREAM_CHUNKS} content chunks + usage", stream, stream_calls, "chunk"),
    )


# ------------------------------------------------------------------------------------------------
# OpenTelemetry SDK set-up


class CountingExporter(SpanExporter):
    """Discards spans, counting them; keeps them only while ``keep`` is set (for the checks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.keep = False
        self.kept: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.count += len(spans)
            if self.keep:
                self.kept.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def finisher() -> Finisher | None:
    """genai-mlflow's span finisher (None if genai-mlflow cannot be imported).

    With ``enabled`` set, LLM spans are finished on its background thread; ``flush(timeout_s)``
    returns True once every task submitted before has run.
    """
    try:
        from genai_mlflow.instrumentation.openai.finisher import FINISHER
    except Exception:
        return None
    return FINISHER


@dataclass
class Telemetry:
    exporter: CountingExporter
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    description: str

    @classmethod
    def create(cls) -> Telemetry:
        exporter = CountingExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        description = (
            "spans: SDK TracerProvider + BatchSpanProcessor (defaults) -> exporter that counts and "
            "discards\nmetrics: SDK MeterProvider + InMemoryMetricReader (aggregates every "
            "measurement, never collected while timing)"
        )
        return cls(exporter, tracer_provider, meter_provider, description)

    def flushed_count(self) -> int:
        """Spans exported so far, once those still on genai-mlflow's finisher and in the span
        processor's queue are out."""
        background = finisher()
        if background is not None and not background.flush(FLUSH_TIMEOUT_S):
            raise RuntimeError(f"genai-mlflow's finisher did not drain within {FLUSH_TIMEOUT_S:.0f} s")
        self.tracer_provider.force_flush()
        return self.exporter.count


# ------------------------------------------------------------------------------------------------
# The SDK floor: what any SDK-based instrumentation emitting the GenAI signals must do per call

FLOOR_SPAN_NAME = f"chat {MODEL}"
FLOOR_INPUT_TOKENS: int = _USAGE["prompt_tokens"]  # 187
FLOOR_OUTPUT_TOKENS: int = _USAGE["completion_tokens"]  # 121
FLOOR_METRIC_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": MODEL,
    "server.address": "bench.local",
    "server.port": 80,
}
FLOOR_START: dict[str, Any] = {
    **FLOOR_METRIC_ATTRIBUTES,
    "gen_ai.request.temperature": 0.2,
    "gen_ai.request.max_tokens": 400,
    "gen_ai.request.stream": False,
    "openai.api.type": "chat_completions",
}
FLOOR_END: dict[str, Any] = {
    "gen_ai.response.id": _HEADER["id"],
    "gen_ai.response.model": _HEADER["model"],
    "openai.response.service_tier": _HEADER["service_tier"],
    "openai.response.system_fingerprint": _HEADER["system_fingerprint"],
    "gen_ai.usage.input_tokens": FLOOR_INPUT_TOKENS,
    "gen_ai.usage.output_tokens": FLOOR_OUTPUT_TOKENS,
    "gen_ai.usage.cache_read.input_tokens": 0,
    "gen_ai.usage.reasoning.output_tokens": 0,
    "gen_ai.response.finish_reasons": ["stop"],
}
FLOOR_DURATION_ATTRIBUTES: dict[str, Any] = {
    **FLOOR_METRIC_ATTRIBUTES,
    "gen_ai.response.model": _HEADER["model"],
}
FLOOR_INPUT_ATTRIBUTES: dict[str, Any] = {**FLOOR_DURATION_ATTRIBUTES, "gen_ai.token.type": "input"}
FLOOR_OUTPUT_ATTRIBUTES: dict[str, Any] = {**FLOOR_DURATION_ATTRIBUTES, "gen_ai.token.type": "output"}
FLOOR_PLAIN_ONLY = "the floor is defined for plain calls"


class SdkFloor:
    """Not an instrumentation: per call, the OpenTelemetry SDK span and the three GenAI histogram
    records (with genai-mlflow's instrument definitions), every attribute a constant. Neither the
    request nor the response is read and no content is captured, so nothing that emits these signals
    through the SDK can cost less. Plain (non-streamed) ``chat.completions.create`` only."""

    def __init__(self) -> None:
        self._instrumented = False

    @property
    def is_instrumented_by_opentelemetry(self) -> bool:
        return self._instrumented

    def instrument(self, tracer_provider: TracerProvider, meter_provider: MeterProvider, **_: Any) -> None:
        from openai.resources.chat.completions import Completions

        from genai_mlflow.instrumentation.openai.call import Instruments

        tracer = tracer_provider.get_tracer("bench_instrumentor.sdk_floor")
        instruments = Instruments.create(meter_provider.get_meter("bench_instrumentor.sdk_floor"))
        duration, token_usage = instruments.duration, instruments.token_usage

        def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
            start = time.perf_counter()
            span = tracer.start_span(FLOOR_SPAN_NAME, kind=SpanKind.CLIENT, attributes=FLOOR_START)
            token = context.attach(trace.set_span_in_context(span))
            try:
                result = wrapped(*args, **kwargs)
            except BaseException:
                span.end()
                raise
            finally:
                context.detach(token)
            span.set_attributes(FLOOR_END)
            span.end()
            duration.record(time.perf_counter() - start, FLOOR_DURATION_ATTRIBUTES)
            token_usage.record(FLOOR_INPUT_TOKENS, FLOOR_INPUT_ATTRIBUTES)
            token_usage.record(FLOOR_OUTPUT_TOKENS, FLOOR_OUTPUT_ATTRIBUTES)
            return result

        wrapt.wrap_function_wrapper(Completions, "create", wrapper)
        self._instrumented = True

    def uninstrument(self) -> None:
        from openai.resources.chat.completions import Completions
        from opentelemetry.instrumentation.utils import unwrap

        if self._instrumented:
            unwrap(Completions, "create")
            self._instrumented = False


# ------------------------------------------------------------------------------------------------
# Contenders


def _nothing() -> None:
    pass


@dataclass
class Contender:
    label: str
    candidates: tuple[tuple[str, str], ...] = ()  # (module, distribution), first importable wins
    extra: dict[str, Any] = field(default_factory=dict)
    # Makes the instrumentor, in place of importing one from ``candidates`` (the SDK floor); ``dist``
    # then names the distribution whose version is shown.
    factory: Callable[[], Any] | None = None
    # genai-mlflow's FINISHER.enabled while instrumented (True: spans finished on a background
    # thread); None for the others, which leave it alone.
    background: bool | None = None
    description: str = ""  # for the legend; the distribution by default
    streamed_problem: str | None = None  # why the streamed workload is not measured, if it is not
    instrumentor: Any = None
    dist: str = ""
    version: str = "-"
    problem: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # workload name -> content captured
    # Set when uninstrument() leaves wrappers behind: the benchmark then removes them itself, since
    # blocks cannot alternate otherwise (and re-instrumenting would nest wrapper on wrapper).
    cleans_up: bool = False
    warnings: list[str] = field(default_factory=list)

    def load(self) -> None:
        if self.factory is not None:
            try:
                self.instrumentor = self.factory()
            except Exception as exc:
                self.problem = f"cannot be made: {type(exc).__name__}: {exc}"
                return
            self._set_version()
            return
        errors = []
        for module_name, dist in self.candidates:
            try:
                module = importlib.import_module(module_name)
                self.instrumentor = module.OpenAIInstrumentor()
            except Exception as exc:
                errors.append(f"{module_name}: {type(exc).__name__}: {exc}")
                continue
            self.dist = dist
            self._set_version()
            return
        self.problem = "not importable (" + "; ".join(errors) + ")"

    def _set_version(self) -> None:
        if not self.dist:
            return
        try:
            self.version = metadata.version(self.dist)
        except metadata.PackageNotFoundError:
            self.version = "?"

    def instrument(self, telemetry: Telemetry) -> None:
        self.instrumentor.instrument(
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
            raise_exception_on_conflict=True,
            **self.extra,
        )
        if not self.instrumentor.is_instrumented_by_opentelemetry:
            raise RuntimeError("instrument() returned without instrumenting")
        if self.background is not None:
            self._finisher().enabled = self.background

    def settle(self) -> None:
        """Wait for this contender's background work so far (on a timed block's process clock)."""
        if self.background and not self._finisher().flush(FLUSH_TIMEOUT_S):
            raise RuntimeError(f"{self.label}: background work not done within {FLUSH_TIMEOUT_S:.0f} s")

    def uninstrument(self) -> None:
        if self.background is not None:
            background = self._finisher()
            background.flush(FLUSH_TIMEOUT_S)
            background.enabled = False
        self.instrumentor.uninstrument()
        if self.cleans_up:
            leftover_wrappers(remove=True)

    def _finisher(self) -> Finisher:
        background = finisher()
        if background is None:
            raise RuntimeError("genai-mlflow's finisher cannot be imported")
        return background

    def legend(self) -> str:
        return self.description or self.dist or " / ".join(d for _, d in self.candidates)


def contenders() -> list[Contender]:
    ours = (("genai_mlflow", "genai-mlflow"),)
    return [
        Contender(
            "genai-mlflow",
            ours,
            extra={"capture_content": True},
            background=True,
            description=(
                "genai-mlflow as genai_mlflow.instrument() runs it: spans finished on a background thread"
            ),
        ),
        Contender(
            "genai-mlflow inline",
            ours,
            extra={"capture_content": True},
            background=False,
            description="genai-mlflow's OpenAIInstrumentor on its own: spans finished on the caller's thread",
        ),
        Contender(
            "official",
            (
                ("opentelemetry.instrumentation.genai.openai", "opentelemetry-instrumentation-genai-openai"),
                ("opentelemetry.instrumentation.openai_v2", "opentelemetry-instrumentation-openai-v2"),
            ),
        ),
        Contender(
            "Traceloop",
            (("opentelemetry.instrumentation.openai", "opentelemetry-instrumentation-openai"),),
        ),
        Contender(
            "SDK floor",
            factory=SdkFloor,
            dist="opentelemetry-sdk",
            description=(
                "the OpenTelemetry SDK span and the three GenAI histogram records alone, attributes "
                "precomputed: the least any SDK-based instrumentation emitting these signals can cost; "
                "not an instrumentation"
            ),
            streamed_problem=FLOOR_PLAIN_ONLY,
        ),
    ]


def select(players: list[Contender], only: Sequence[str]) -> list[Contender] | str:
    """The contenders ``only`` names, in their usual order: each entry picks the contender with that
    exact label (case-insensitive), else every contender whose label starts with it. A message when
    an entry picks none."""
    chosen: set[str] = set()
    for wanted in only:
        exact = [c.label for c in players if c.label.lower() == wanted.lower()]
        prefixed = [c.label for c in players if c.label.lower().startswith(wanted.lower())]
        picked = exact or prefixed
        if not picked:
            return f"--only {wanted!r} matches none of: {', '.join(c.label for c in players)}"
        chosen.update(picked)
    return [c for c in players if c.label in chosen]


# wrapt 2.x proxies (FunctionWrapper included) derive from BaseObjectProxy; 1.x has ObjectProxy only.
_PROXY: Any = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)


def _create_is_bare() -> bool:
    """No wrapt proxy on ``Completions.create`` (the client's own decorators use ``functools.wraps``,
    so ``__wrapped__`` alone proves nothing)."""
    from openai.resources.chat.completions import Completions

    return not isinstance(Completions.__dict__["create"], _PROXY)


def leftover_wrappers(remove: bool) -> list[str]:
    """wrapt proxies still on the client's resource classes, optionally put back to the originals."""
    found = []
    seen: set[int] = set()
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("openai.resources") or module is None:
            continue
        for klass in list(vars(module).values()):
            if not isinstance(klass, type) or id(klass) in seen or not klass.__module__.startswith("openai."):
                continue
            seen.add(id(klass))
            for name, value in list(vars(klass).items()):
                if not isinstance(value, _PROXY):
                    continue
                found.append(f"{klass.__module__.removeprefix('openai.resources.')}.{klass.__name__}.{name}")
                original: Any = value
                while isinstance(original, _PROXY):
                    original = original.__wrapped__
                if remove:
                    setattr(klass, name, original)
    return sorted(set(found))


def _texts(span: ReadableSpan) -> Iterator[str]:
    for value in (span.attributes or {}).values():
        yield str(value)
    for event in span.events:
        for value in (event.attributes or {}).values():
            yield str(value)


def check(contender: Contender, workload: Workload, telemetry: Telemetry, calls: int = 3) -> str | None:
    """None when the contender traces this workload as it should, otherwise why not.

    Whatever happens, the client is left bare (no wrapt proxies) for the next contender.
    """
    exporter = telemetry.exporter
    before = telemetry.flushed_count()
    exporter.kept.clear()
    exporter.keep = True
    try:
        return _check(contender, workload, telemetry, calls, before)
    finally:
        exporter.keep = False
        exporter.kept.clear()
        leftover_wrappers(remove=True)


def _check(
    contender: Contender, workload: Workload, telemetry: Telemetry, calls: int, before: int
) -> str | None:
    try:
        contender.instrument(telemetry)
    except Exception as exc:
        return f"instrument() failed: {type(exc).__name__}: {exc}"
    try:
        for _ in range(calls):
            workload.call()
    except Exception as exc:
        return f"the call failed while instrumented: {type(exc).__name__}: {exc}"
    finally:
        try:
            contender.uninstrument()
        except Exception as exc:
            return f"uninstrument() failed: {type(exc).__name__}: {exc}"
    made = telemetry.flushed_count() - before
    if made != calls:
        return f"made {made} spans for {calls} calls"
    left = leftover_wrappers(remove=False)
    if left:
        if contender.cleans_up:
            return f"uninstrument() left wrappers even after clean-up: {', '.join(left)}"
        contender.cleans_up = True
        leftover_wrappers(remove=True)
        contender.warnings.append(
            f"uninstrument() leaves its wrappers on {len(left)} methods ({', '.join(left[:3])}, ...); "
            "the benchmark unwraps them after each instrumented block"
        )
    workload.call()
    if telemetry.flushed_count() - before != calls:
        return "still tracing after uninstrument()"
    texts = [text for span in telemetry.exporter.kept for text in _texts(span)]
    captured = [
        name
        for name, marker in (("in", INPUT_MARKER), ("out", OUTPUT_MARKER))
        if any(marker in t for t in texts)
    ]
    contender.notes[workload.name] = "+".join(captured) or "none"
    return None


# ------------------------------------------------------------------------------------------------
# Timing

Clock = Literal["caller", "process"]
CLOCKS: tuple[Clock, ...] = ("caller", "process")


class Times(NamedTuple):
    """Microseconds per call over one block, on each clock."""

    caller: float  # CPU time of the calling thread: what the app's own thread pays
    process: float  # CPU time of the whole process: all the work, background threads included

    def on(self, clock: Clock) -> float:
        return self.caller if clock == "caller" else self.process


def time_block(call: Callable[[], None], calls: int, settle: Callable[[], None] = _nothing) -> Times:
    """Per-call times over one block, started from an empty young generation. ``settle`` waits for
    the block's background work, so that the process clock counts it."""
    gc.collect()
    caller, process = time.thread_time_ns(), time.process_time_ns()
    for _ in range(calls):
        call()
    settle()
    process_end, caller_end = time.process_time_ns(), time.thread_time_ns()
    return Times((caller_end - caller) / calls / 1000, (process_end - process) / calls / 1000)


@dataclass
class Series:
    bare: list[Times] = field(default_factory=list)
    instrumented: list[Times] = field(default_factory=list)
    problem: str | None = None

    def ratios(self, clock: Clock) -> list[float]:
        return [i.on(clock) / b.on(clock) for b, i in zip(self.bare, self.instrumented, strict=True)]

    def added(self, clock: Clock) -> list[float]:
        return [i.on(clock) - b.on(clock) for b, i in zip(self.bare, self.instrumented, strict=True)]


def run_pair(
    contender: Contender, workload: Workload, telemetry: Telemetry, bare_first: bool
) -> tuple[Times, Times]:
    def instrumented() -> Times:
        contender.instrument(telemetry)
        try:
            return time_block(workload.call, workload.calls_per_block, contender.settle)
        finally:
            contender.uninstrument()

    if bare_first:
        bare = time_block(workload.call, workload.calls_per_block)
        return bare, instrumented()
    inst = instrumented()
    return time_block(workload.call, workload.calls_per_block), inst


@dataclass
class Measured:
    series: dict[str, Series]
    spans: int  # exported while timing (warm-up pairs included)
    expected: int  # one per instrumented call


def measure(workload: Workload, players: list[Contender], telemetry: Telemetry, pairs: int) -> Measured:
    results = {c.label: Series() for c in players}
    active: list[Contender] = []
    for contender in players:
        problem = contender.problem
        if problem is None and workload.per == "chunk":
            problem = contender.streamed_problem
        if problem is None:
            problem = check(contender, workload, telemetry)
        if problem is not None:
            results[contender.label].problem = problem
            continue
        active.append(contender)
    before = telemetry.flushed_count()
    for contender in active:
        run_pair(contender, workload, telemetry, bare_first=True)  # warm-up, not recorded
    for round_ in range(pairs):
        for contender in active:
            bare, inst = run_pair(contender, workload, telemetry, bare_first=round_ % 2 == 0)
            results[contender.label].bare.append(bare)
            results[contender.label].instrumented.append(inst)
        print(f"\r  {workload.name}: round {round_ + 1}/{pairs}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    spans = telemetry.flushed_count() - before
    return Measured(results, spans, len(active) * (pairs + 1) * workload.calls_per_block)


# ------------------------------------------------------------------------------------------------
# Report


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(workload: Workload, players: list[Contender], measured: Measured) -> str:
    results = measured.series
    per_chunk = workload.per == "chunk"
    header = ["instrumentation", "bare µs"]
    for clock in CLOCKS:
        header += [f"+µs {clock}"] + ([f"+µs/chunk {clock}"] if per_chunk else [])
        header += [f"ratio {clock}", "IQR"]
    header += ["content", "goal"]
    rows = [header]
    na_lines = []
    measured_pairs = 0
    for contender in players:
        series = results[contender.label]
        name = f"{contender.label} {contender.version}"
        if series.problem is not None or not series.bare:
            na_lines.append(f"  {contender.label}: n/a: {series.problem or 'not measured'}")
            rows.append([name] + ["n/a"] * (len(header) - 1))
            continue
        measured_pairs = max(measured_pairs, len(series.bare))
        row = [name, f"{statistics.median(b.caller for b in series.bare):.1f}"]
        for clock in CLOCKS:
            added = statistics.median(series.added(clock))
            row.append(f"{added:+.1f}")
            if per_chunk:
                row.append(f"{added / STREAM_CHUNKS:+.2f}")
            q1, q3 = _quartiles(series.ratios(clock))
            row += [f"{statistics.median(series.ratios(clock)):.3f}", f"{q1:.3f}-{q3:.3f}"]
        caller_ratio = statistics.median(series.ratios("caller"))
        row += [
            contender.notes.get(workload.name, "?"),
            "ok" if caller_ratio <= GOAL_RATIO else "MISS",
        ]
        rows.append(row)
    title = f"{workload.name} ({measured_pairs} pairs of {workload.calls_per_block}-call blocks)"
    if per_chunk:
        title += f"; +µs/chunk = +µs per call / {STREAM_CHUNKS}"
    verdict = "ok" if measured.spans == measured.expected else "MISMATCH: figures not trustworthy"
    spans = f"spans exported while timing: {measured.spans} of {measured.expected} expected ({verdict})"
    text = f"{title}\n{table(rows)}\n  {spans}"
    if na_lines:
        text += "\n" + "\n".join(na_lines)
    return text


def legend(players: list[Contender]) -> str:
    return "\n".join(f"  {c.label} = {c.legend()}" for c in players)


def warnings_text(players: list[Contender]) -> str:
    return "\n".join(f"note: {c.label}: {w}" for c in players for w in dict.fromkeys(c.warnings))


def versions() -> str:
    httpx = httpx_module()
    parts = [
        f"Python {platform.python_version()}",
        f"openai {openai.__version__}",
        f"{httpx.__name__} {metadata.version(httpx.__name__)}",
        f"opentelemetry-sdk {metadata.version('opentelemetry-sdk')}",
        f"wrapt {metadata.version('wrapt')}",
        f"{os.cpu_count()} cpus",
    ]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# Profile (investigation aid)


def profile(contender: Contender, telemetry: Telemetry, calls: int) -> int:
    """cProfile of one contender's instrumented, non-streamed call, on the calling thread only (work
    on background threads is not seen); cProfile inflates small functions."""
    chat, _ = workloads(calls, 1)
    contender.load()
    if contender.problem is not None:
        print(f"{contender.label}: n/a: {contender.problem}", file=sys.stderr)
        return 1
    contender.instrument(telemetry)
    try:
        for _ in range(200):
            chat.call()
        contender.settle()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            chat.call()
        profiler.disable()
    finally:
        contender.uninstrument()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(r"genai_mlflow|opentelemetry|wrapt|bench_instrumentor", 40)
    print(f"cProfile of {calls} calls instrumented by {contender.label} = {contender.legend()}")
    print("(calling thread only; times are totals over all calls)")
    print(out.getvalue())
    return 0


# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short run: few, small blocks")
    parser.add_argument("--pairs", type=int, help="alternated bare/instrumented block pairs per contender")
    parser.add_argument("--calls", type=int, help="non-streamed calls per block")
    parser.add_argument("--stream-calls", type=int, help="streamed calls per block")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming case")
    parser.add_argument(
        "--only",
        action="append",
        help="contender label, else label prefix (repeatable; 'genai' picks both genai-mlflow rows)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the first selected contender's wrapper instead (default genai-mlflow)",
    )
    args = parser.parse_args(argv)

    # The contenders log their own trouble; the checks report it as n/a instead.
    logging.basicConfig(level=logging.CRITICAL)
    players = contenders()
    if args.only:
        selected = select(players, args.only)
        if isinstance(selected, str):
            print(selected, file=sys.stderr)
            return 2
        players = selected
    telemetry = Telemetry.create()
    if args.profile:
        return profile(players[0], telemetry, args.calls or 2000)

    pairs = args.pairs or (6 if args.quick else 30)
    calls = args.calls or (60 if args.quick else 250)
    stream_calls = args.stream_calls or (3 if args.quick else 10)
    chat, stream = workloads(calls, stream_calls)
    for contender in players:
        contender.load()
    if not _create_is_bare():
        print("Completions.create is already wrapped before the run: results would be wrong", file=sys.stderr)
        return 1

    for _ in range(max(100, calls)):  # warm-up: imports, caches, pydantic models
        chat.call()
    for _ in range(5):
        stream.call()
    # Everything alive now (the imported libraries: over 100,000 objects) goes to the permanent
    # generation, so the gc.collect() before each block costs well under a millisecond rather than
    # over a hundred, and no full collection of that heap lands inside a timed block by chance.
    gc.collect()
    gc.freeze()

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = [(chat, measure(chat, players, telemetry, pairs))]
    if not args.no_stream:
        results.append((stream, measure(stream, players, telemetry, pairs)))
    elapsed = time.perf_counter() - started
    telemetry.tracer_provider.shutdown()

    kind = "quick" if args.quick else "full"
    print(f"OpenAI instrumentation overhead ({kind} run, {elapsed:.0f} s of timing)")
    print(versions())
    print(telemetry.description)
    print(
        "method: alternated bare/instrumented blocks in one process, order flipped each round;\n"
        "        medians over pairs of the per-pair ratio (instr/bare) and difference (+µs), per clock\n"
        "clocks, read together around each block:\n"
        "  caller  = CPU time of the calling thread: what the app's own thread pays\n"
        "  process = CPU time of the whole process, all threads: all the work, background included\n"
        "            (each block waits for its contender's background work before the clocks are read)\n"
        "bare µs is per call, on the caller clock\n"
        f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print("contenders (content capture on for each, except the SDK floor):\n" + legend(players))
    print(f"goal: caller ratio <= {GOAL_RATIO:.2f}; the process ratio counts background work too")
    for workload, result in results:
        print()
        print(report(workload, players, result))
    notes = warnings_text(players)
    if notes:
        print("\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
