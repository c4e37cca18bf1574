"""Pure translation of OTLP spans into what genai-mlflow writes to MLflow.

- ``local_traces`` / ``merge`` / ``is_complete``: spans grouped into local traces (one trace, one process).
- ``run_record``: mode ``call``, one run per local trace.
- ``window_points``: mode ``window``, one metric step per LLM call.
- ``trace_request``: the spans as MLflow's ``/v1/traces`` needs them, plus the content to offload.

Nothing here does I/O. MLflow's limits and ingest rules are in ``tests/MLFLOW_OTLP_NOTES.md``.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags, Status

from genai_mlflow import semconv as sc

from .pricing import Cost, PriceTable

DEFAULT_PERSONA = "default"
UNKNOWN_MODEL = "unknown"
DEFAULT_CONTENT_BOUND = 16 * 1024
MAX_PERSONA_CHARS = 200
# MLflow limits (see the notes): log_batch params, key and value lengths, run names, ids.
MAX_PARAMS = 100
MAX_PARAM_VALUE_CHARS = 6000
MAX_KEY_CHARS = 250
MAX_TAG_VALUE_CHARS = 8000
MAX_RUN_NAME_CHARS = 250
MAX_ID_CHARS = 250  # a longer session id makes MLflow reject the whole trace request
MAX_RESOURCE_VALUE_CHARS = 1000  # each resource attribute becomes a tag on every trace
OFFLOAD_PREVIEW_CHARS = 1000
PREVIEW_TEXT_CHARS = 2000  # MLflow's trace list shows 1000; the root span's inputs show the rest
OFFLOAD_DIR = "genai_content"

_NS_PER_MS = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_PARENT = (b"", bytes(8))
_PARENT_REMOTE_KNOWN = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_PARENT_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_ID_KEYS = frozenset({sc.SESSION_ID, sc.GEN_AI_CONVERSATION_ID, sc.USER_ID})
# Params a reader looks for first; the rest follow alphabetically.
_PARAM_ORDER = (
    sc.PARAM_MODEL,
    sc.PARAM_PROVIDER,
    sc.PARAM_OPERATION,
    sc.PARAM_PROMPTS,
    sc.PARAM_PROMPT_NAME,
    sc.PARAM_PROMPT_VERSION,
    sc.PARAM_AB_TEST,
    sc.PARAM_VARIANT,
    sc.PARAM_APP_VERSION,
    *(
        sc.PARAM_REQUEST_PREFIX + name
        for name in (
            "model",
            "max_tokens",
            "temperature",
            "top_p",
            "stream",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "stop_sequences",
            "choice.count",
            "service_tier",
            "reasoning_effort",
            "output_type",
        )
    ),
)
_PARAM_RANK = {key: rank for rank, key in enumerate(_PARAM_ORDER)}
# MLflow also allows '/' and ':' in keys, but '/' can make a key path-like (rejected) and MLflow
# servers on Windows reject ':'.
_UNSAFE_KEY_CHARS = re.compile(r"[^\w.\- ]")
_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_BIDI_CONTROLS = frozenset({"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"})
_ZWJ = "\u200d"
# A trace's labels (see context.py) and the run params they become.
_LABEL_PARAMS = {
    sc.GENAI_MLFLOW_PROMPTS: sc.PARAM_PROMPTS,
    sc.GENAI_MLFLOW_PROMPT_NAME: sc.PARAM_PROMPT_NAME,
    sc.GENAI_MLFLOW_PROMPT_VERSION: sc.PARAM_PROMPT_VERSION,
    sc.GENAI_MLFLOW_AB_TEST: sc.PARAM_AB_TEST,
    sc.GENAI_MLFLOW_VARIANT: sc.PARAM_VARIANT,
    sc.GENAI_MLFLOW_APP_VERSION: sc.PARAM_APP_VERSION,
}

# Whether a prompt version (name, version) is in MLflow's Prompt Registry, so that links to it resolve.
Registered = Callable[[str, str], bool]


def _none_registered(name: str, version: str) -> bool:
    return False


# ---------------------------------------------------------------------------------------------
# Attribute values


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a Python value (arrays as lists, kvlists as dicts)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def to_any_value(value: Any) -> AnyValue:
    if value is None:
        return AnyValue()
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Mapping):
        pairs = [KeyValue(key=str(k), value=to_any_value(v)) for k, v in value.items()]
        return AnyValue(kvlist_value=KeyValueList(values=pairs))
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[to_any_value(v) for v in value]))
    return AnyValue(string_value=_scrub(str(value)))


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


def span_attributes(span: Span) -> dict[str, Any]:
    return attributes(span.attributes)


def _attribute(span: Span, key: str) -> Any:
    for kv in reversed(span.attributes):  # the last wins, as in span_attributes
        if kv.key == key:
            return any_value(kv.value)
    return None


def _int(value: Any) -> int | None:
    """Token counts arrive as ints, or as numeric strings from some SDKs."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [str(v) for v in value if v not in (None, "")]
    return []


def _scrub(text: str) -> str:
    """Lone surrogates (from JSON ``\\ud800`` escapes) cannot be encoded into protobuf or a database."""
    return _SURROGATES.sub("\ufffd", text)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=_bytes_hex)


def _bytes_hex(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) else repr(value)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


def _utc(unix_nano: int) -> datetime:
    return _EPOCH + timedelta(microseconds=unix_nano // 1000)


# ---------------------------------------------------------------------------------------------
# Local traces


def is_genai(span: Span) -> bool:
    """A span from a GenAI instrumentation: it has ``gen_ai.operation.name``."""
    return bool(_attribute(span, sc.GEN_AI_OPERATION_NAME))


def is_llm_call(span: Span) -> bool:
    """A GenAI span that is a model call (chat, completion, embeddings...), not a tool or agent span."""
    operation = _attribute(span, sc.GEN_AI_OPERATION_NAME)
    return bool(operation) and operation not in sc.NON_MODEL_OPERATIONS


def has_valid_ids(span: Span) -> bool:
    """MLflow rejects a whole request for one span with a missing id."""
    return len(span.trace_id) == 16 and any(span.trace_id) and len(span.span_id) == 8 and any(span.span_id)


def _by_start(span: Span) -> tuple[int, int]:
    return (span.start_time_unix_nano, -span.end_time_unix_nano)


@dataclass
class LocalTrace:
    """Every span of one trace from one process (one resource). Treated as immutable."""

    trace_id: bytes
    spans: list[Span]
    resource_attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def trace_id_hex(self) -> str:
        return self.trace_id.hex()

    @property
    def span_ids(self) -> frozenset[bytes]:
        return frozenset(s.span_id for s in self.spans)

    @property
    def tops(self) -> list[Span]:
        """Spans whose parent is not here, earliest first: the local root, and orphans."""
        ids = self.span_ids
        return sorted((s for s in self.spans if _parent(s) not in ids), key=_by_start)

    @property
    def root(self) -> Span | None:
        """The local root: no parent, or a remote one. A parent that is local (per the OTLP span
        flags) but missing means the root has not arrived. Without flags (older exporters), a
        missing parent is taken to be remote."""
        return next((s for s in self.tops if _parent_is_remote_or_none(s)), None)

    @property
    def top(self) -> Span:
        """The span a run and a trace hang from: the root, or while it is missing the earliest orphan."""
        root = self.root
        if root is not None:
            return root
        tops = self.tops
        if tops:
            return tops[0]
        if not self.spans:
            raise ValueError(f"trace {self.trace_id_hex} has no spans")
        return min(self.spans, key=_by_start)  # a parent cycle: malformed, but still readable

    @property
    def genai_spans(self) -> list[Span]:
        return sorted((s for s in self.spans if is_genai(s)), key=_by_start)

    @property
    def llm_spans(self) -> list[Span]:
        return sorted((s for s in self.spans if is_llm_call(s)), key=_by_start)


def _parent(span: Span) -> bytes:
    return b"" if span.parent_span_id in _NO_PARENT else span.parent_span_id


def _parent_is_remote_or_none(span: Span) -> bool:
    if not _parent(span):
        return True
    if span.flags & _PARENT_REMOTE_KNOWN:
        return bool(span.flags & _PARENT_REMOTE)
    return True


def has_parent(span: Span) -> bool:
    return bool(_parent(span))


def is_local_root(span: Span) -> bool:
    """Certainly the local root: no parent, or one its flags call remote. (Without those flags a
    parent may be local, the root still to come.)"""
    if not _parent(span):
        return True
    return bool(span.flags & _PARENT_REMOTE_KNOWN and span.flags & _PARENT_REMOTE)


def _resource_key(resource_attributes: Mapping[str, Any]) -> str:
    return json.dumps(resource_attributes, sort_keys=True, default=_bytes_hex)


def local_traces(request: ExportTraceServiceRequest) -> list[LocalTrace]:
    """Spans grouped by (resource, trace id), in order of first appearance. Spans without valid
    ids are left out (MLflow would reject them); a span sent twice keeps its last version."""
    groups: dict[tuple[str, bytes], tuple[dict[str, Any], dict[bytes, Span]]] = {}
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        key = _resource_key(resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if has_valid_ids(span):
                    groups.setdefault((key, span.trace_id), (resource, {}))[1][span.span_id] = span
    return [
        LocalTrace(trace_id, list(spans.values()), resource)
        for (_, trace_id), (resource, spans) in groups.items()
    ]


def merge(traces: Iterable[LocalTrace]) -> list[LocalTrace]:
    """Parts of the same trace id as one trace: spans deduped by span id (the last wins), resource
    attributes merged (the last wins)."""
    merged: dict[bytes, tuple[dict[str, Any], dict[bytes, Span]]] = {}
    for trace in traces:
        resource, spans = merged.setdefault(trace.trace_id, ({}, {}))
        resource.update(trace.resource_attributes)
        for span in trace.spans:
            spans[span.span_id] = span
    return [
        LocalTrace(trace_id, list(spans.values()), resource) for trace_id, (resource, spans) in merged.items()
    ]


def is_complete(trace: LocalTrace) -> bool:
    """Its local root span is here."""
    return trace.root is not None


# ---------------------------------------------------------------------------------------------
# Personas and experiments


def normalise_persona(name: str | None) -> str:
    """A persona fit for an experiment name and tags.

    NFC; control, line-separator and bidi-override characters and lone surrogates removed; trimmed;
    at most 200 characters, cut before a whole character (an emoji sequence or a letter with its
    accents is not split). MLflow accepts any other character in experiment names, ``/`` and
    ``_`` included, so they stay. Empty gives ``default``.
    """
    if not name:
        return DEFAULT_PERSONA
    text = unicodedata.normalize("NFC", str(name))
    text = "".join(ch for ch in text if not _dropped_from_persona(ch)).strip()
    if len(text) > MAX_PERSONA_CHARS:
        cut = MAX_PERSONA_CHARS
        while cut > 0 and (_extends_character(text[cut]) or text[cut - 1] == _ZWJ):
            cut -= 1
        text = text[:cut].rstrip()
    return text or DEFAULT_PERSONA


def _dropped_from_persona(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category in ("Cc", "Cs", "Zl", "Zp") or unicodedata.bidirectional(ch) in _BIDI_CONTROLS


def _extends_character(ch: str) -> bool:
    """Combining marks, joiners, skin tones and emoji tags belong to the character before them."""
    code = ord(ch)
    return (
        unicodedata.category(ch).startswith("M")
        or ch == _ZWJ
        or 0x1F3FB <= code <= 0x1F3FF
        or 0xE0020 <= code <= 0xE007F
    )


def trace_persona(trace: LocalTrace) -> str:
    """The root-most span's ``gen_ai.agent.name``, else the resource's, else ``default``; normalised."""
    depths = _depths(trace.spans)
    named = [(s, _attribute(s, sc.GEN_AI_AGENT_NAME)) for s in trace.spans]
    named = [(s, n) for s, n in named if isinstance(n, str) and n.strip()]
    if named:
        _, name = min(named, key=lambda pair: (depths[pair[0].span_id], *_by_start(pair[0])))
        return normalise_persona(name)
    resource_name = trace.resource_attributes.get(sc.GEN_AI_AGENT_NAME)
    return normalise_persona(resource_name if isinstance(resource_name, str) else None)


def _depths(spans: Sequence[Span]) -> dict[bytes, int]:
    """Each span's distance from the top of what is here (0 for a span whose parent is absent)."""
    parents = {s.span_id: _parent(s) for s in spans}
    depths: dict[bytes, int] = {}
    for start in parents:
        chain: list[bytes] = []
        seen: set[bytes] = set()
        current = start
        while current in parents and current not in depths and current not in seen:
            chain.append(current)
            seen.add(current)
            current = parents[current]
        base = depths.get(current, -1)  # -1 past the top, or on a cycle
        for offset, span_id in enumerate(reversed(chain), start=1):
            depths[span_id] = base + offset
    return depths


def experiment_name(persona: str, day: date) -> str:
    return f"{persona}_{day:%Y-%m-%d}"


def experiment_tags(persona: str, day: date) -> dict[str, str]:
    """Code finds experiments by these tags, never by parsing the name (personas may contain ``_``)."""
    return {sc.GENAI_MLFLOW_PERSONA: persona, sc.GENAI_MLFLOW_DATE: f"{day:%Y-%m-%d}"}


# ---------------------------------------------------------------------------------------------
# LLM calls


@dataclass(frozen=True)
class _Call:
    """One LLM span, read once."""

    span: Span
    attrs: dict[str, Any]
    cost: Cost | None = None  # None: not priced

    def priced(self, prices: PriceTable) -> _Call:
        cached = self.tokens(sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS) or 0
        cost = prices.cost(self.model, self.input_tokens, self.output_tokens, cached)
        if cost is None and self.input_tokens == 0 and self.output_tokens == 0:
            cost = Cost(0.0, 0.0, 0.0)  # no tokens used (e.g. a failed call): nothing to price
        return replace(self, cost=cost)

    @property
    def model(self) -> str | None:
        for key in (sc.GEN_AI_RESPONSE_MODEL, sc.GEN_AI_REQUEST_MODEL):
            value = self.attrs.get(key)
            if isinstance(value, str) and value:
                return value
        return None

    @property
    def provider(self) -> str | None:
        value = self.attrs.get(sc.GEN_AI_PROVIDER_NAME) or self.attrs.get(sc.GEN_AI_SYSTEM)
        return str(value) if value else None

    @property
    def operation(self) -> str:
        return str(self.attrs.get(sc.GEN_AI_OPERATION_NAME) or "")

    def tokens(self, key: str) -> int | None:
        return _int(self.attrs.get(key))

    @property
    def input_tokens(self) -> int:
        return self.tokens(sc.GEN_AI_USAGE_INPUT_TOKENS) or 0

    @property
    def output_tokens(self) -> int:
        return self.tokens(sc.GEN_AI_USAGE_OUTPUT_TOKENS) or 0

    @property
    def failed(self) -> bool:
        return self.span.status.code == Status.STATUS_CODE_ERROR or bool(self.attrs.get(sc.ERROR_TYPE))

    @property
    def error_type(self) -> str | None:
        if not self.failed:
            return None
        return str(self.attrs.get(sc.ERROR_TYPE) or "_OTHER")  # semconv's fallback value

    @property
    def finish_reasons(self) -> list[str]:
        return _strings(self.attrs.get(sc.GEN_AI_RESPONSE_FINISH_REASONS))

    @property
    def latency_ms(self) -> float:
        return max(0, self.span.end_time_unix_nano - self.span.start_time_unix_nano) / _NS_PER_MS

    @property
    def content_captured(self) -> bool:
        return sc.GEN_AI_INPUT_MESSAGES in self.attrs or sc.GEN_AI_OUTPUT_MESSAGES in self.attrs


def _calls(trace: LocalTrace, prices: PriceTable) -> list[_Call]:
    """The trace's LLM calls by start time, each priced from ``prices``."""
    return [_Call(span, span_attributes(span)).priced(prices) for span in trace.llm_spans]


def _dedupe(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


# ---------------------------------------------------------------------------------------------
# Mode call: one run per local trace


@dataclass(frozen=True)
class RunRecord:
    trace_id: str  # 32 hex
    persona: str
    day: date  # UTC date of the root span's start
    experiment_name: str
    run_name: str  # the root span's name
    start_ms: int
    end_ms: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    status: str  # "FINISHED" or "FAILED"


def run_record(trace: LocalTrace, prices: PriceTable, registered: Registered = _none_registered) -> RunRecord:
    """The run of a local trace (mode ``call``). An incomplete trace hangs from its earliest orphan."""
    top = trace.top
    persona = trace_persona(trace)
    day = _utc(top.start_time_unix_nano).date()
    calls = _calls(trace, prices)
    labels = trace_labels(trace, calls)
    label_params = {_LABEL_PARAMS[k]: v for k, v in labels.items() if k in _LABEL_PARAMS}
    params, dropped = _run_params(calls, label_params)
    run_name = _cut(top.name, MAX_RUN_NAME_CHARS) or trace.trace_id_hex
    tags = _run_tags(trace, calls, persona, run_name)
    app_version = labels.get(sc.GENAI_MLFLOW_APP_VERSION)
    if app_version:
        tags[sc.GENAI_MLFLOW_APP_VERSION] = _cut(app_version, MAX_TAG_VALUE_CHARS)
    linked = linked_prompts(labels, registered)
    if linked:
        tags[sc.MLFLOW_LINKED_PROMPTS] = linked_prompts_json(linked)
    if dropped:
        tags[sc.GENAI_MLFLOW_PARAMS_TRUNCATED] = str(dropped)
    unknown = _dedupe((c.model or UNKNOWN_MODEL) for c in calls if c.cost is None)
    if unknown:
        tags[sc.GENAI_MLFLOW_COST_UNKNOWN_MODELS] = _cut(",".join(unknown), MAX_TAG_VALUE_CHARS)
    return RunRecord(
        trace_id=trace.trace_id_hex,
        persona=persona,
        day=day,
        experiment_name=experiment_name(persona, day),
        run_name=run_name,
        start_ms=top.start_time_unix_nano // _NS_PER_MS,
        end_ms=max(top.end_time_unix_nano, top.start_time_unix_nano) // _NS_PER_MS,
        params=params,
        metrics=_run_metrics(top, calls),
        tags=tags,
        status="FAILED" if any(c.failed for c in calls) else "FINISHED",
    )


def trace_links(trace: LocalTrace, prices: PriceTable, registered: Registered) -> TraceLinks:
    """What a landed trace is linked to, besides its run."""
    top = trace.top
    labels = trace_labels(trace, _calls(trace, prices))
    start_ms = top.start_time_unix_nano // _NS_PER_MS
    end_ms = max(top.end_time_unix_nano, top.start_time_unix_nano) // _NS_PER_MS
    failed = top.status.code == Status.STATUS_CODE_ERROR
    return TraceLinks(
        trace_id=trace.trace_id_hex,
        prompts=tuple(linked_prompts(labels, registered)),
        app_version=labels.get(sc.GENAI_MLFLOW_APP_VERSION),
        timing=TraceTiming(start_ms, end_ms - start_ms, "ERROR" if failed else "OK"),
    )


class TraceTiming(NamedTuple):
    """A trace's start, duration and state, as MLflow has them."""

    start_ms: int
    duration_ms: int
    state: str  # "OK" or "ERROR"


@dataclass(frozen=True)
class TraceLinks:
    trace_id: str  # 32 hex
    prompts: tuple[tuple[str, str], ...]  # registered (name, version) pairs
    app_version: str | None  # "mixed" where its calls differ
    timing: TraceTiming


def _run_params(calls: Sequence[_Call], labels: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """Params every call shares (``mixed`` where they differ) and the trace's labels, most useful
    first, at most 100; also how many were dropped."""
    per_call = [_call_params(c) for c in calls]
    keys = list(dict.fromkeys(k for params in per_call for k in params))
    shared: dict[str, str] = {}
    for key in keys:
        shared[key] = _shared([params.get(key) for params in per_call]) or sc.PARAM_MIXED
    shared.update((key, _param_value(value)) for key, value in labels.items())
    ordered = sorted(shared, key=lambda k: (_PARAM_RANK.get(k, len(_PARAM_RANK)), k))
    kept = ordered[:MAX_PARAMS]
    return {k: shared[k] for k in kept}, len(ordered) - len(kept)


def _shared(values: Sequence[str | None]) -> str | None:
    """The one value all share; ``mixed`` where they differ, including where some lack it (the
    one value would misdescribe those); None where none has one."""
    distinct = set(values)
    if distinct == {None}:
        return None
    return distinct.pop() if len(distinct) == 1 else sc.PARAM_MIXED


def trace_labels(trace: LocalTrace, calls: Sequence[_Call]) -> dict[str, str]:
    """What the trace's LLM calls were made with, under their ``genai_mlflow.*`` keys: every prompt
    used (``name/version``, in order of first use), and the prompt, A/B test, variant, app version
    and requested model shared by all its calls (``mixed`` where they differ)."""
    labels: dict[str, str] = {}
    refs = _dedupe(ref for c in calls for ref in _text(c.attrs.get(sc.GENAI_MLFLOW_PROMPTS) or "").split(","))
    if refs:
        labels[sc.GENAI_MLFLOW_PROMPTS] = ",".join(refs)
    service_version = trace.resource_attributes.get(sc.SERVICE_VERSION)
    for key in (
        sc.GENAI_MLFLOW_PROMPT_NAME,
        sc.GENAI_MLFLOW_PROMPT_VERSION,
        sc.GENAI_MLFLOW_AB_TEST,
        sc.GENAI_MLFLOW_VARIANT,
        sc.GENAI_MLFLOW_APP_VERSION,
        sc.GENAI_MLFLOW_MODEL,
    ):
        values = []
        for call in calls:
            value = call.attrs.get(sc.GEN_AI_REQUEST_MODEL if key == sc.GENAI_MLFLOW_MODEL else key)
            if value in (None, "") and key == sc.GENAI_MLFLOW_APP_VERSION:
                value = service_version  # the app's resource says which version it is
            values.append(None if value in (None, "") else _text(value))
        shared = _shared(values)
        if shared is not None:
            labels[key] = shared
    return labels


def linked_prompts(labels: Mapping[str, str], registered: Registered) -> list[tuple[str, str]]:
    """The registered prompt versions among the trace's prompts, to link it to."""
    linked = []
    for ref in labels.get(sc.GENAI_MLFLOW_PROMPTS, "").split(","):
        name, _, version = ref.partition("/")
        # The registry's versions are numbers; MLflow fails on any other link.
        if name and version.isdigit() and registered(name, version):
            linked.append((name, version))
    return linked


def linked_prompts_json(linked: Sequence[tuple[str, str]]) -> str:
    """``mlflow.linkedPrompts``, as MLflow writes it on runs and traces."""
    return json.dumps([{"name": name, "version": version} for name, version in linked])


def _call_params(call: _Call) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in ((sc.PARAM_MODEL, call.model), (sc.PARAM_PROVIDER, call.provider)):
        if value:
            params[key] = _param_value(value)
    if call.operation:
        params[sc.PARAM_OPERATION] = _param_value(call.operation)
    for key, value in call.attrs.items():
        name = _request_param_name(key)
        if name and value is not None:
            params.setdefault(_param_key(sc.PARAM_REQUEST_PREFIX + name), _param_value(value))
    return params


def _request_param_name(key: str) -> str | None:
    for prefix in (sc.GEN_AI_REQUEST_PREFIX, sc.OPENAI_REQUEST_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix) :]
    if key == sc.GEN_AI_OUTPUT_TYPE:  # the request's response_format, under its semconv name
        return "output_type"
    return None


def _param_key(key: str) -> str:
    return _cut(_UNSAFE_KEY_CHARS.sub("_", key), MAX_KEY_CHARS)


def _param_value(value: Any) -> str:
    return _cut(_text(value), MAX_PARAM_VALUE_CHARS)


def _run_metrics(top: Span, calls: Sequence[_Call]) -> dict[str, float]:
    prompt = sum(c.input_tokens for c in calls)
    completion = sum(c.output_tokens for c in calls)
    metrics = {
        sc.METRIC_PROMPT_TOKENS: float(prompt),
        sc.METRIC_COMPLETION_TOKENS: float(completion),
        sc.METRIC_TOTAL_TOKENS: float(prompt + completion),
        sc.METRIC_LLM_CALLS: float(len(calls)),
        sc.METRIC_LATENCY_MS: max(0, top.end_time_unix_nano - top.start_time_unix_nano) / _NS_PER_MS,
    }
    for metric, key in (
        (sc.METRIC_CACHED_TOKENS, sc.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS),
        (sc.METRIC_REASONING_TOKENS, sc.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS),
    ):
        counts = [n for n in (c.tokens(key) for c in calls) if n is not None]
        if counts:
            metrics[metric] = float(sum(counts))
    costs = [c.cost for c in calls]
    if all(cost is not None for cost in costs):
        metrics[sc.METRIC_COST_USD] = _total_cost(costs)
    ttft_ms = _time_to_first_token_ms(calls)
    if ttft_ms is not None:
        metrics[sc.METRIC_TIME_TO_FIRST_TOKEN_MS] = ttft_ms
    return metrics


def _time_to_first_token_ms(calls: Sequence[_Call]) -> float | None:
    for call in calls:  # by start time: the first streamed call's
        ttfc = _float(call.attrs.get(sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK))
        if ttfc is not None:
            return ttfc * 1000.0  # the span has seconds
    return None


def _total_cost(costs: Iterable[Cost | None]) -> float:
    return math.fsum(c.total_cost for c in costs if c is not None)


def _run_tags(trace: LocalTrace, calls: Sequence[_Call], persona: str, run_name: str) -> dict[str, str]:
    tags = {
        sc.GENAI_MLFLOW_TRACE_ID: trace.trace_id_hex,
        sc.GENAI_MLFLOW_PERSONA: persona,
        sc.MLFLOW_RUN_NAME: run_name,
    }
    reasons = _dedupe(r for c in calls for r in c.finish_reasons)
    if reasons:
        tags[sc.TAG_FINISH_REASONS] = ",".join(reasons)
    errors = _dedupe(c.error_type or "" for c in calls)
    if errors:
        tags[sc.ERROR_TYPE] = ",".join(errors)
    conversation = _first_string(trace, (sc.GEN_AI_CONVERSATION_ID, sc.SESSION_ID))
    if conversation:
        tags[sc.GEN_AI_CONVERSATION_ID] = _cut(conversation, MAX_ID_CHARS)  # as the trace's session
    user = _first_string(trace, (sc.USER_ID,))
    if user:
        tags[sc.USER_ID] = _cut(user, MAX_ID_CHARS)
    service = trace.resource_attributes.get(sc.SERVICE_NAME)
    if service:
        tags[sc.SERVICE_NAME] = _text(service)
    return {k: _cut(v, MAX_TAG_VALUE_CHARS) for k, v in tags.items()}


def _first_string(trace: LocalTrace, keys: Sequence[str]) -> str | None:
    """The first of ``keys`` found on a span (earliest first), else on the resource."""
    for span in sorted(trace.spans, key=_by_start):
        for key in keys:
            value = _attribute(span, key)
            if value not in (None, ""):
                return _text(value)
    for key in keys:
        value = trace.resource_attributes.get(key)
        if value not in (None, ""):
            return _text(value)
    return None


# ---------------------------------------------------------------------------------------------
# Mode window: one metric step per LLM call


@dataclass(frozen=True)
class WindowPoint:
    key: str  # f"{persona}|{model}|{hour:%Y-%m-%dT%H}": the genai_mlflow.window tag value
    persona: str
    model: str
    hour: datetime  # UTC, the call's end truncated to the hour
    timestamp_ms: int  # the call's end time
    metrics: dict[str, float]  # per call; no cost_usd when the model is not priced
    failed: bool
    app_version: str | None = None


def window_points(trace: LocalTrace, prices: PriceTable) -> list[WindowPoint]:
    persona = trace_persona(trace)
    service_version = trace.resource_attributes.get(sc.SERVICE_VERSION)
    points = []
    for call in _calls(trace, prices):
        version = call.attrs.get(sc.GENAI_MLFLOW_APP_VERSION) or service_version
        end = call.span.end_time_unix_nano
        hour = _utc(end).replace(minute=0, second=0, microsecond=0)
        model = call.model or UNKNOWN_MODEL
        metrics = {
            sc.METRIC_LATENCY_MS: call.latency_ms,
            sc.METRIC_PROMPT_TOKENS: float(call.input_tokens),
            sc.METRIC_COMPLETION_TOKENS: float(call.output_tokens),
            sc.METRIC_TOTAL_TOKENS: float(call.input_tokens + call.output_tokens),
        }
        if call.cost is not None:
            metrics[sc.METRIC_COST_USD] = call.cost.total_cost
        points.append(
            WindowPoint(
                key=f"{persona}|{model}|{hour:%Y-%m-%dT%H}",
                persona=persona,
                model=model,
                hour=hour,
                timestamp_ms=end // _NS_PER_MS,
                metrics=metrics,
                failed=call.failed,
                app_version=_text(version) if version else None,
            )
        )
    return points


# ---------------------------------------------------------------------------------------------
# Traces for MLflow's /v1/traces


@dataclass(frozen=True)
class Offload:
    """A span attribute too large to inline, for the writer to upload to the artifact store."""

    span_id: str  # 16 hex
    key: str  # the attribute
    artifact_path: str  # genai_content/<trace_id>/<span_id>/<key>.json (.txt if not JSON)
    content: str  # the attribute's whole value


def trace_request(
    traces: Sequence[LocalTrace],
    prices: PriceTable,
    *,
    content_bound: int = DEFAULT_CONTENT_BOUND,
    artifact_uri: Callable[[str], str] = lambda path: path,
    registered: Registered = _none_registered,
) -> tuple[ExportTraceServiceRequest, list[Offload]]:
    """The traces as MLflow needs them, and the content to upload before posting them.

    The inputs are not changed. Per trace, in one ResourceSpans with its small resource attributes:

    - the top span (the local root) is sent as the root: a remote parent is dropped and kept as
      ``genai_mlflow.remote_parent_span_id``; other spans whose parent is absent hang from it, so
      MLflow shows one tree;
    - the root gets the trace tags (trace id, persona, trace name, the labels of ``trace_labels``
      and the time to first token), the links to the ``registered`` prompt versions it used, and
      readable previews (see ``_previews``);
    - each LLM span gets ``mlflow.llm.cost`` from ``prices``, as the run's ``cost_usd`` does;
    - session and user ids are cut to 250 characters, and string attributes over ``content_bound``
      UTF-8 bytes are replaced by a reference to ``artifact_uri(path)`` with a preview.
    """
    request = ExportTraceServiceRequest()
    offloads: list[Offload] = []
    for trace in traces:
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.extend(_small_resource_attributes(trace.resource_attributes))
        spans = resource_spans.scope_spans.add().spans
        spans.extend(_mlflow_spans(trace, prices, content_bound, artifact_uri, offloads, registered))
    return request, offloads


def _small_resource_attributes(resource: Mapping[str, Any]) -> list[KeyValue]:
    return [
        KeyValue(key=key, value=to_any_value(value))
        for key, value in resource.items()
        if len(_text(value)) <= MAX_RESOURCE_VALUE_CHARS
    ]


def _mlflow_spans(
    trace: LocalTrace,
    prices: PriceTable,
    content_bound: int,
    artifact_uri: Callable[[str], str],
    offloads: list[Offload],
    registered: Registered,
) -> list[Span]:
    top = trace.top
    ids = trace.span_ids
    calls = {c.span.span_id: c for c in _calls(trace, prices)}
    ordered = [top, *(s for s in trace.spans if s.span_id != top.span_id)]  # the first root wins
    out = []
    for span in ordered:
        attrs: dict[str, AnyValue] = {}
        for kv in span.attributes:
            attrs[kv.key] = _bounded(trace, span, kv, content_bound, artifact_uri, offloads)
        copy = Span()
        copy.CopyFrom(span)
        parent = _parent(span)
        if span is top or parent not in ids:
            copy.parent_span_id = b"" if span is top else top.span_id
            if parent:
                attrs[sc.GENAI_MLFLOW_REMOTE_PARENT_SPAN_ID] = AnyValue(string_value=parent.hex())
        call = calls.get(span.span_id)
        if call is not None and call.cost is not None:
            attrs[sc.MLFLOW_LLM_COST] = AnyValue(string_value=json.dumps(call.cost.as_dict()))
        if span is top:
            _add_root_attributes(attrs, trace, list(calls.values()), registered)
        del copy.attributes[:]
        copy.attributes.extend(KeyValue(key=k, value=v) for k, v in attrs.items())
        out.append(copy)
    return out


def _bounded(
    trace: LocalTrace,
    span: Span,
    kv: KeyValue,
    content_bound: int,
    artifact_uri: Callable[[str], str],
    offloads: list[Offload],
) -> AnyValue:
    if kv.value.WhichOneof("value") != "string_value":
        return kv.value
    value = kv.value.string_value
    if kv.key in _ID_KEYS and len(value) > MAX_ID_CHARS:
        return AnyValue(string_value=value[:MAX_ID_CHARS])
    if len(value) <= content_bound // 4:  # cannot exceed the bound even at 4 bytes a character
        return kv.value
    size = len(value.encode("utf-8"))
    if size <= content_bound:
        return kv.value
    offload = _offload(trace.trace_id_hex, span.span_id.hex(), kv.key, value)
    offloads.append(offload)
    reference = {
        sc.GENAI_MLFLOW_OFFLOADED: artifact_uri(offload.artifact_path),
        "bytes": size,
        "preview": value[:OFFLOAD_PREVIEW_CHARS],
    }
    return AnyValue(string_value=json.dumps(reference, ensure_ascii=False))


def _offload(trace_hex: str, span_hex: str, key: str, value: str) -> Offload:
    try:
        json.loads(value)
        suffix = ".json"
    except ValueError:
        suffix = ".txt"  # not JSON (or cut short by the instrumentation): keep it as text
    name = _UNSAFE_PATH_CHARS.sub("_", key)
    path = f"{OFFLOAD_DIR}/{trace_hex}/{span_hex}/{name}{suffix}"
    return Offload(span_id=span_hex, key=key, artifact_path=path, content=value)


def _add_root_attributes(
    attrs: dict[str, AnyValue], trace: LocalTrace, calls: Sequence[_Call], registered: Registered
) -> None:
    top = trace.top
    labels = trace_labels(trace, calls)
    tags = {
        sc.GENAI_MLFLOW_TRACE_ID: trace.trace_id_hex,
        sc.GENAI_MLFLOW_PERSONA: trace_persona(trace),
        sc.MLFLOW_TRACE_NAME: top.name,
        **labels,
    }
    ttft_ms = _time_to_first_token_ms(calls)
    if ttft_ms is not None:
        tags[sc.GENAI_MLFLOW_TTFT_MS] = repr(ttft_ms)
    linked = linked_prompts(labels, registered)
    if linked:
        tags[sc.MLFLOW_LINKED_PROMPTS] = linked_prompts_json(linked)
    for key, value in tags.items():
        attrs[sc.MLFLOW_TRACE_TAG_PREFIX + key] = AnyValue(string_value=_cut(value, MAX_TAG_VALUE_CHARS))
    if calls:
        inputs, outputs = _previews(calls)
        # An app's own MLflow previews on its root span are kept.
        attrs.setdefault(sc.MLFLOW_SPAN_INPUTS, AnyValue(string_value=inputs))
        attrs.setdefault(sc.MLFLOW_SPAN_OUTPUTS, AnyValue(string_value=outputs))


# ---------------------------------------------------------------------------------------------
# Previews: what the MLflow trace list shows for a trace


def _previews(calls: Sequence[_Call]) -> tuple[str, str]:
    """``mlflow.spanInputs`` and ``mlflow.spanOutputs`` for the root span, in the shapes MLflow
    turns into plain-text previews.

    Request: the last user message of the first LLM call. Response: the answer of the last LLM
    call to end, text parts joined, tool calls as ``name({"arg": ...})`` lines. Each is at most
    2000 characters. Without content (capture off), or where a side has none (a failed call, an
    embedding), a summary that says what happened instead::

        request:  "chat gpt-4o-mini (content not captured)"
        response: "finish: stop; 12 input + 3 output tokens (content not captured)"
                  "failed: RateLimitError"
                  "tool calls: get_weather; finish: tool_calls; 40 input + 12 output tokens"
    """
    first = calls[0]
    last = max(calls, key=lambda c: (c.span.end_time_unix_nano, c.span.start_time_unix_nano))
    request = _user_text(first) or _request_summary(first)
    response = _answer_text(last) or _response_summary(last)
    inputs = {"messages": [{"role": "user", "content": _preview_text(request)}]}
    outputs = {"choices": [{"message": {"role": "assistant", "content": _preview_text(response)}}]}
    return json.dumps(inputs, ensure_ascii=False), json.dumps(outputs, ensure_ascii=False)


def _preview_text(text: str) -> str:
    text = _scrub(text.strip())
    return text if len(text) <= PREVIEW_TEXT_CHARS else text[: PREVIEW_TEXT_CHARS - 1] + "…"


def _messages(call: _Call, key: str) -> list[Mapping[str, Any]]:
    raw = call.attrs.get(key)
    if not isinstance(raw, str):
        return []
    try:
        messages = json.loads(raw)
    except ValueError:  # e.g. cut short by the instrumentation's size bound
        return []
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, Mapping)]


def _user_text(call: _Call) -> str:
    for message in reversed(_messages(call, sc.GEN_AI_INPUT_MESSAGES)):
        if message.get("role") == "user":
            text = _message_text(message)
            if text:
                return text
    return ""


def _answer_text(call: _Call) -> str:
    messages = _messages(call, sc.GEN_AI_OUTPUT_MESSAGES)
    return _message_text(messages[0]) if messages else ""  # the first choice


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")  # OpenAI-style messages from other instrumentations
    if isinstance(content, str):
        return content
    parts = message.get("parts")
    if not isinstance(parts, list):
        return ""
    return "\n".join(text for text in (_part_text(p) for p in parts if isinstance(p, Mapping)) if text)


def _part_text(part: Mapping[str, Any]) -> str:
    kind = part.get("type")
    if kind == "text":
        content = part.get("content")
        return content if isinstance(content, str) else ""
    if kind == "tool_call":
        arguments = part.get("arguments")
        if arguments is None:
            arguments = ""
        elif not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        return f"{part.get('name') or 'tool'}({arguments})"
    if kind == "tool_call_response":
        return _text(part.get("response", ""))
    if kind in ("blob", "uri", "file"):
        return f"[{part.get('modality') or kind}]"
    return ""  # reasoning and unknown parts are not the message


def _request_summary(call: _Call) -> str:
    model = call.attrs.get(sc.GEN_AI_REQUEST_MODEL) or call.model  # what was asked for, as in the span name
    described = " ".join(str(p) for p in (call.operation, model) if p) or call.span.name
    if sc.GEN_AI_INPUT_MESSAGES not in call.attrs:
        return f"{described} (content not captured)"
    return f"{described} (no user text)"


def _response_summary(call: _Call) -> str:
    bits = []
    if call.failed:
        bits.append(f"failed: {call.error_type}")
    tools = _strings(call.attrs.get(sc.GENAI_MLFLOW_TOOL_CALL_NAMES))
    if tools:
        bits.append("tool calls: " + ", ".join(tools))
    if call.finish_reasons and not call.failed:
        bits.append("finish: " + ", ".join(call.finish_reasons))
    input_tokens = call.tokens(sc.GEN_AI_USAGE_INPUT_TOKENS)
    output_tokens = call.tokens(sc.GEN_AI_USAGE_OUTPUT_TOKENS)
    if input_tokens is not None and output_tokens is not None:
        bits.append(f"{input_tokens} input + {output_tokens} output tokens")
    elif input_tokens is not None:
        bits.append(f"{input_tokens} input tokens")
    summary = "; ".join(bits) or "no answer"
    return f"{summary} (content not captured)" if not call.content_captured else summary
