"""Reads a persona's LLM calls back from MLflow for ``genai-mlflow compare``: one row per trace.

Only trace *infos* are read (state, duration, token usage, cost, tags), in bulk, never spans and never
one trace at a time (see docs/mlflow-prompt-notes.md §5):

* the persona's experiments are found by their ``genai_mlflow.persona`` tag (never by name: ``_`` is
  a LIKE wildcard), and kept when their ``genai_mlflow.date`` tag falls in the range;
* traces are filtered by time on the server (``trace.timestamp_ms``), and by A/B test where one is
  asked for;
* on a server, raw REST (``POST /api/3.0/mlflow/traces/search``, 500 per page, the most it allows)
  from a pool of threads, parsing only the JSON fields needed. Each experiment's time window is split
  into slices of about one page each, every slice queried on its own, so that the threads share the
  pages of one experiment as well as the experiments (see ``_Reader``);
* on a local store (``sqlite:///...``), MLflow's store API in this process, pages of 50,000.

Speed (benchmarks/bench_compare.py, 100,000 traces over 7 days, 2 shared vCPUs running everything):
about 13 s from the server with 8 threads (22 s with 1), bound by the server's own CPU, about
0.2 ms a trace to build, serialise and send each TraceInfo, while parsing here costs 0.02 ms; about
10 s from the embedded store, three quarters of it in MLflow building TraceInfo objects. On
PostgreSQL, tables never analyzed (autovacuum off) make the server scan all trace tags per page:
30 s instead of 13.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from genai_mlflow import semconv as sc
from genai_mlflow.compare.stats import Samples
from genai_mlflow.exporter.records import normalise_persona

if TYPE_CHECKING:
    from genai_mlflow.exporter.gateway import RestGateway

GROUP_TAGS: Final[dict[str, str]] = {
    "prompt_version": sc.GENAI_MLFLOW_PROMPTS,
    "model": sc.GENAI_MLFLOW_MODEL,
    "variant": sc.GENAI_MLFLOW_VARIANT,
    "app_version": sc.GENAI_MLFLOW_APP_VERSION,
}

REST_PAGE: Final = 500  # the server's limit for traces/search
STORE_PAGE: Final = 50_000  # the store's limit for search_traces
EXPERIMENT_PAGE: Final = 1000
# A slice is cut to hold about this share of a page, so that most slices take one request even where
# the traffic is uneven; a slice that still fills its page is split again.
SLICE_FILL: Final = 0.8
MAX_SLICES_PER_SPLIT: Final = 64
STORE_WORKERS: Final = 2  # in process the work is Python under the GIL: more threads only contend

# Trace metadata MLflow fills from the spans (TraceMetadataKey.TOKEN_USAGE and COST).
_TOKEN_USAGE: Final = "mlflow.trace.tokenUsage"
_COST: Final = "mlflow.trace.cost"
_MS: Final = timedelta(milliseconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NAN: Final = math.nan
_DATES_SHOWN: Final = 10


class CompareError(Exception):
    """The calls cannot be read: unknown grouping, no experiment in range, MLflow unreachable."""


class AmbiguousTestError(CompareError, ValueError):
    """``by="variant"`` without a test, where the calls hold variants of several A/B tests."""


@dataclass(frozen=True)
class Calls:
    """What was read."""

    samples: Samples
    experiments: list[str]  # names read
    unlabelled: int  # traces in range without the group tag (left out, reported)
    tests: list[str]  # A/B test names seen (for --by variant)
    since: datetime
    until: datetime


@dataclass(frozen=True)
class _Experiment:
    experiment_id: str
    name: str
    day: date


# One trace: (group, ab_test, ok, latency_ms, input, output, total tokens, ttft_ms, cost_usd).
_Row = tuple[str | None, str | None, bool, float, float, float, float, float, float]


@dataclass
class _Page:
    rows: list[_Row]
    next_token: str | None
    newest_ms: int = 0  # the first row's timestamp (pages come newest first)
    oldest_ms: int = 0  # the last row's timestamp
    oldest_count: int = 0  # rows at the end of the page with the last row's timestamp


@dataclass(frozen=True)
class _Slice:
    """Traces of one experiment with ``lo_ms <= timestamp < hi_ms``; ``token`` pages by offset, only
    used where the slice cannot be cut finer (over a page of traces within one millisecond)."""

    experiment_id: str
    lo_ms: int
    hi_ms: int
    day_start_ms: int
    token: str | None = None


class _Source:
    """Where the trace infos come from: a server over REST, or a local store."""

    page_size: int
    workers: int

    def experiments(self, persona: str) -> list[_Experiment]:
        raise NotImplementedError

    def search(
        self, experiment_id: str, filter_string: str, token: str | None, tag: str, full: bool
    ) -> _Page:
        """One page of trace infos, newest first, grouped by ``tag``; ``full`` asks for the page's
        timestamps too (to cut the slice)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def read_calls(
    tracking_uri: str,
    persona: str,
    *,
    since: datetime,
    until: datetime,
    by: str,
    test: str | None = None,
    workers: int = 8,
) -> Calls:
    """The persona's calls with ``since <= start < until`` (naive datetimes are UTC), grouped by the
    trace tag ``GROUP_TAGS[by]``, and restricted to the A/B test ``test`` if given.

    Reads the persona's experiments dated from ``since`` to ``until`` (the date of its last
    millisecond, as ``until`` itself is excluded).
    """
    tag = GROUP_TAGS.get(by)
    if tag is None:
        raise CompareError(f"cannot group by {by!r}; choose one of {', '.join(GROUP_TAGS)}")
    persona = normalise_persona(persona)  # as the exporter named it
    since, until = as_utc(since), as_utc(until)
    if until <= since:
        raise CompareError(f"empty time range: since {since:%Y-%m-%d %H:%M:%S} is not before until")
    source = _open(tracking_uri, workers)
    try:
        found = source.experiments(persona)
        # ``until`` is excluded: at midnight, that day's experiment holds nothing in range.
        first, last = since.date(), (until - _MS).date()
        experiments = sorted((e for e in found if first <= e.day <= last), key=lambda e: e.day)
        if not experiments:
            raise CompareError(_no_experiment(tracking_uri, persona, first, last, found))
        test_filter = None if test is None else _equals(f"tags.`{sc.GENAI_MLFLOW_AB_TEST}`", test)
        reader = _Reader(source, tag, test_filter)
        rows = reader.read([_first_slice(e, since, until) for e in experiments])
    finally:
        source.close()
    if test is not None:  # the server filtered already, unless the name could not be quoted
        rows = [r for r in rows if r[1] == test]
    labelled = [r for r in rows if r[0]]
    tests = sorted({r[1] for r in labelled if r[1]})
    if by == "variant" and test is None and len(tests) > 1:
        raise AmbiguousTestError(
            f"the calls of persona {persona!r} hold variants of {len(tests)} A/B tests "
            f"({', '.join(tests)}); pass --test with one of them"
        )
    return Calls(
        samples=_samples(labelled),
        experiments=[e.name for e in experiments],
        unlabelled=len(rows) - len(labelled),
        tests=tests,
        since=since,
        until=until,
    )


# ---------------------------------------------------------------------------------------------
# Reading the slices


class _Reader:
    """Reads slices from a pool of threads, cutting a slice that fills its page into finer ones.

    A page comes newest first, so when a slice [lo, hi) fills its page, every trace newer than the
    page's oldest timestamp t is in it. The page is kept but for its rows at t, and [lo, t] is cut
    into pieces of about ``SLICE_FILL`` pages each (the page's rate over time gives the estimate),
    which the threads read in parallel. Each slice is a fixed time window queried once, so nothing
    shifts or repeats while traces keep landing; offset pages (stable on a fixed window) are only
    used for more than a page of traces within one millisecond.
    """

    def __init__(self, source: _Source, tag: str, extra_filter: str | None = None) -> None:
        self._source = source
        self._tag = tag
        self._extra = "" if extra_filter is None else f" AND {extra_filter}"

    def read(self, slices: Iterable[_Slice]) -> list[_Row]:
        rows: list[_Row] = []
        with ThreadPoolExecutor(self._source.workers, thread_name_prefix="genai-mlflow-compare") as pool:
            pending: set[Future[tuple[list[_Row], list[_Slice]]]] = {
                pool.submit(self._read_slice, s) for s in slices
            }
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        found, more = future.result()
                        rows.extend(found)
                        pending.update(pool.submit(self._read_slice, s) for s in more)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        return rows

    def _read_slice(self, piece: _Slice) -> tuple[list[_Row], list[_Slice]]:
        # Slices lie within [since, until): their bounds are the time filter.
        window = f"trace.timestamp_ms >= {piece.lo_ms} AND trace.timestamp_ms < {piece.hi_ms}{self._extra}"
        one_ms = piece.hi_ms - piece.lo_ms <= 1
        page = self._source.search(piece.experiment_id, window, piece.token, self._tag, not one_ms)
        if page.next_token is None:
            return page.rows, []
        if piece.token is not None or one_ms:
            return page.rows, [_Slice(piece.experiment_id, piece.lo_ms, piece.hi_ms, 0, page.next_token)]
        more: list[_Slice] = []
        rows = page.rows
        if page.newest_ms == page.oldest_ms:
            # A whole page within one millisecond: page on through that millisecond by offset
            # (the same order, so the same offset), and cut what is older.
            more.append(_Slice(piece.experiment_id, page.oldest_ms, page.oldest_ms + 1, 0, page.next_token))
            rest_hi = page.oldest_ms
        else:
            rows = rows[: len(rows) - page.oldest_count]  # the rest of that millisecond comes later
            rest_hi = page.oldest_ms + 1
        rate = len(page.rows) / (page.newest_ms - page.oldest_ms + 1)  # traces per ms
        more.extend(self._cut(piece, rest_hi, rate))
        return rows, more

    def _cut(self, piece: _Slice, hi: int, rate: float) -> list[_Slice]:
        """[lo, hi) in pieces of about SLICE_FILL pages. What lies before the experiment's day (a
        trace filed under the day its root started, yet timed a little earlier) is one piece, so
        that the estimate only spreads over the day."""
        lo = piece.lo_ms
        pieces: list[_Slice] = []
        if lo < piece.day_start_ms < hi:
            pieces.append(_Slice(piece.experiment_id, lo, piece.day_start_ms, piece.day_start_ms))
            lo = piece.day_start_ms
        if lo >= hi:
            return pieces
        expected = rate * (hi - lo)
        count = max(
            2, min(MAX_SLICES_PER_SPLIT, hi - lo, math.ceil(expected / (SLICE_FILL * self._source.page_size)))
        )
        bounds = [lo + (hi - lo) * i // count for i in range(count + 1)]
        pieces.extend(
            _Slice(piece.experiment_id, a, b, piece.day_start_ms)
            for a, b in itertools.pairwise(bounds)
            if a < b
        )
        return pieces


def _first_slice(experiment: _Experiment, since: datetime, until: datetime) -> _Slice:
    day_start = datetime.combine(experiment.day, datetime.min.time(), tzinfo=UTC)
    return _Slice(experiment.experiment_id, _ms(since), _ms(until), max(_ms(since), _ms(day_start)))


# ---------------------------------------------------------------------------------------------
# A trace's row


def _row(tags: dict[str, str], metadata: dict[str, str], ok: bool, duration_ms: float, tag: str) -> _Row:
    # About 100k of these per comparison: plain lookups, one JSON decode per metadata value, and the
    # check for infinities left to numpy (``_samples``).
    tokens = _json_object(metadata.get(_TOKEN_USAGE))
    cost = _json_object(metadata.get(_COST))
    return (
        tags.get(tag) or None,
        tags.get(sc.GENAI_MLFLOW_AB_TEST) or None,
        ok,
        duration_ms,
        _number(tokens.get("input_tokens")),
        _number(tokens.get("output_tokens")),
        _number(tokens.get("total_tokens")),
        _number(tags.get(sc.GENAI_MLFLOW_TTFT_MS)),
        _number(cost.get("total_cost")),
    )


_decode = json.JSONDecoder().decode
_NO_OBJECT: Final[dict[str, Any]] = {}


def _json_object(text: str | None) -> dict[str, Any]:
    if not text:
        return _NO_OBJECT
    try:
        value = _decode(text)
    except ValueError:
        return _NO_OBJECT
    return value if type(value) is dict else _NO_OBJECT


def _number(value: Any) -> float:
    """A float, else NaN (absent, not a number)."""
    kind = type(value)
    if kind is int or kind is float:  # a JSON number: the usual case
        return float(value)
    if kind is not str:  # None, a bool, a list...
        return _NAN
    try:
        return float(value)
    except ValueError:
        return _NAN


def _samples(rows: Sequence[_Row]) -> Samples:
    if not rows:
        empty = np.empty(0, dtype=np.float64)
        return Samples(np.empty(0, dtype=object), np.empty(0, dtype=bool), *([empty] * 6))
    group, _, ok, latency, input_tokens, output_tokens, total_tokens, ttft, cost = zip(*rows, strict=True)
    floats = [
        np.array(c, dtype=np.float64)
        for c in (latency, input_tokens, output_tokens, total_tokens, ttft, cost)
    ]
    for column in floats:
        column[~np.isfinite(column)] = np.nan  # "inf" in a tag, Infinity in JSON: unknown
    return Samples(np.array(group, dtype=object), np.array(ok, dtype=bool), *floats)


# ---------------------------------------------------------------------------------------------
# Sources


def _open(tracking_uri: str, workers: int) -> _Source:
    if tracking_uri.startswith(("http://", "https://")):
        return _RestSource(tracking_uri, workers)
    return _StoreSource(tracking_uri, workers)


class _RestSource(_Source):
    """An MLflow server, through the exporter's REST client: the credentials, TLS options and headers
    MLflow's own client would send, on one pooled session."""

    page_size = REST_PAGE

    def __init__(self, tracking_uri: str, workers: int) -> None:
        from genai_mlflow.exporter.gateway import RestGateway

        self.tracking_uri = tracking_uri
        self.workers = max(1, workers)
        self._gateway: RestGateway = RestGateway(tracking_uri)
        self._gateway.reserve_connections(self.workers)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        from genai_mlflow.exporter.gateway import GatewayError

        try:
            answer = self._gateway.request("POST", path, json=body)
        except GatewayError as exc:
            if exc.retryable and exc.__cause__ is not None:  # no answer at all
                raise CompareError(f"cannot reach MLflow at {self.tracking_uri}: {exc.__cause__}") from exc
            raise CompareError(f"MLflow at {self.tracking_uri}: {exc}") from exc
        if not isinstance(answer, dict):  # e.g. a proxy's HTML page: not an MLflow server
            raise CompareError(f"MLflow at {self.tracking_uri}: POST {path} did not answer with JSON")
        return answer

    def experiments(self, persona: str) -> list[_Experiment]:
        body: dict[str, Any] = {
            "max_results": EXPERIMENT_PAGE,
            "view_type": "ACTIVE_ONLY",
            "filter": _persona_filter(persona),
        }
        found: list[_Experiment] = []
        while True:
            answer = self._post("/api/2.0/mlflow/experiments/search", body)
            for experiment in answer.get("experiments") or ():
                tags = {t.get("key"): t.get("value") for t in experiment.get("tags") or ()}
                kept = _experiment(
                    str(experiment.get("experiment_id")), experiment.get("name", ""), tags, persona
                )
                if kept is not None:
                    found.append(kept)
            token = answer.get("next_page_token")
            if not token:
                return found
            body["page_token"] = token

    def search(
        self, experiment_id: str, filter_string: str, token: str | None, tag: str, full: bool
    ) -> _Page:
        body: dict[str, Any] = {
            "locations": [
                {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}
            ],
            "filter": filter_string,
            "max_results": self.page_size,
        }
        if token:
            body["page_token"] = token
        answer = self._post("/api/3.0/mlflow/traces/search", body)
        traces: list[dict[str, Any]] = answer.get("traces") or []
        rows = [
            _row(
                t.get("tags") or {},
                t.get("trace_metadata") or {},
                t.get("state") == "OK",
                _duration_ms(t.get("execution_duration")),
                tag,
            )
            for t in traces
        ]
        page = _Page(rows, answer.get("next_page_token") or None)
        if full and page.next_token and traces:
            # The timestamps of the first and last rows only; equal JSON timestamps are equal times.
            oldest = traces[-1].get("request_time")
            page.newest_ms = _timestamp_ms(traces[0].get("request_time"))
            page.oldest_ms = _timestamp_ms(oldest)
            page.oldest_count = _count_tail(traces, lambda t: t.get("request_time") == oldest)
        return page


class _StoreSource(_Source):
    """A local tracking store, through MLflow's store API in this process."""

    page_size = STORE_PAGE

    def __init__(self, tracking_uri: str, workers: int) -> None:
        from mlflow.tracking._tracking_service.utils import _get_store

        if tracking_uri.startswith("sqlite:///"):
            path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
            if path and path != ":memory:" and not os.path.exists(path):
                # MLflow would create an empty database here; a reader should not.
                raise CompareError(
                    f"no MLflow database at {tracking_uri} ({os.path.abspath(path)} does not exist)"
                )
        self.tracking_uri = tracking_uri
        self.workers = max(1, min(workers, STORE_WORKERS))
        try:
            self._store = _get_store(tracking_uri)  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise CompareError(f"cannot open the MLflow store at {tracking_uri}: {exc}") from exc

    def experiments(self, persona: str) -> list[_Experiment]:
        from mlflow.entities import ViewType

        found: list[_Experiment] = []
        token = None
        while True:
            try:
                page = self._store.search_experiments(
                    view_type=ViewType.ACTIVE_ONLY,
                    max_results=EXPERIMENT_PAGE,
                    filter_string=_persona_filter(persona),
                    page_token=token,
                )
            except Exception as exc:
                raise CompareError(f"cannot read experiments from {self.tracking_uri}: {exc}") from exc
            for experiment in page:
                kept = _experiment(str(experiment.experiment_id), experiment.name, experiment.tags, persona)
                if kept is not None:
                    found.append(kept)
            token = page.token
            if not token:
                return found

    def search(
        self, experiment_id: str, filter_string: str, token: str | None, tag: str, full: bool
    ) -> _Page:
        infos, next_token = self._store.search_traces(
            locations=[experiment_id],
            filter_string=filter_string,
            max_results=self.page_size,
            page_token=token,
        )
        rows = [
            _row(
                info.tags,
                info.trace_metadata,
                info.state.value == "OK",
                _NAN if info.execution_duration is None else float(info.execution_duration),
                tag,
            )
            for info in infos
        ]
        page = _Page(rows, next_token or None)
        if full and page.next_token and infos:
            page.newest_ms = int(infos[0].request_time)
            page.oldest_ms = int(infos[-1].request_time)
            page.oldest_count = _count_tail(infos, lambda i: i.request_time == page.oldest_ms)
        return page


def _count_tail(items: Sequence[Any], same: Callable[[Any], bool]) -> int:
    count = 0
    for item in reversed(items):
        if not same(item):
            break
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Experiments, filters, times


def _persona_filter(persona: str) -> str:
    key = f"tags.`{sc.GENAI_MLFLOW_PERSONA}`"
    exact = _equals(key, persona)
    if exact is not None:
        return exact
    # Both quote characters: MLflow's filters have no escape, so match them with "_" and keep
    # only the exact persona (``_experiment`` checks the tag).
    return f"{key} LIKE '{persona.replace(chr(39), '_').replace(chr(34), '_')}'"


def _equals(key: str, value: str) -> str | None:
    """``key = 'value'``; MLflow takes a quoted value verbatim (no escapes), so a value with a single
    quote goes in double quotes, and one with both cannot be written (None)."""
    if "'" not in value:
        return f"{key} = '{value}'"
    if '"' not in value:
        return f'{key} = "{value}"'
    return None


def _experiment(experiment_id: str, name: str, tags: dict[str, str], persona: str) -> _Experiment | None:
    """The experiment if it holds the persona's calls of one day: the persona tag, exactly, and a
    date tag (the ``<persona>_comparisons`` experiment has neither)."""
    if tags.get(sc.GENAI_MLFLOW_PERSONA) != persona:
        return None
    try:
        day = date.fromisoformat(tags.get(sc.GENAI_MLFLOW_DATE) or "")
    except ValueError:
        return None
    return _Experiment(experiment_id, name, day)


def _no_experiment(uri: str, persona: str, first: date, last: date, found: Sequence[_Experiment]) -> str:
    span = f"on {first}" if first == last else f"from {first} to {last}"
    message = f"no experiment of persona {persona!r} {span} (UTC) at {uri}"
    days = sorted({e.day.isoformat() for e in found})
    if not days:
        return message + "; MLflow has no experiment of this persona at all"
    shown = days if len(days) <= _DATES_SHOWN else [*days[:3], "...", *days[-(_DATES_SHOWN - 4) :]]
    return message + f"; it has calls on {len(days)} other date(s): {', '.join(shown)}"


def as_utc(moment: datetime) -> datetime:
    """Naive datetimes are UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS


def _timestamp_ms(text: str | None) -> int:
    """A protobuf JSON Timestamp ("2026-11-27T07:02:05.705Z") in ms since the epoch."""
    if not text:
        return 0
    return _ms(datetime.fromisoformat(text))


def _duration_ms(text: str | None) -> float:
    """A protobuf JSON Duration ("1.500s") in ms; NaN where absent."""
    if not text or not text.endswith("s"):
        return _NAN
    try:
        return float(text[:-1]) * 1000.0
    except ValueError:
        return _NAN
