"""Reading a persona's calls back for ``genai-mlflow compare``, from the embedded store and a server.

The calls land through the product's own path: OpenTelemetry SDK spans with GenAI attributes and the
``genai_mlflow.*`` labels, through the exporter's pipeline (spool, writer, MLflow), then ``read_calls``
must give back exactly those calls, with the right groups and values.
"""

from __future__ import annotations

import math
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode

from genai_mlflow import semconv as sc
from genai_mlflow.compare import reader
from genai_mlflow.compare.reader import AmbiguousTestError, Calls, CompareError, read_calls
from genai_mlflow.compare.stats import Samples
from genai_mlflow.config import Settings
from genai_mlflow.exporter.pricing import PriceTable
from genai_mlflow.setup import attach, get_pipeline
from genai_mlflow.stack import free_port
from tests.mlflow_stack import MlflowStack
from tests.stack_fixtures import mlflow_server

__all__ = ["mlflow_server"]

TODAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
SINCE = TODAY - timedelta(days=4)
PRICES = PriceTable.load()
NAN = math.nan


@dataclass(frozen=True)
class Call:
    """One LLM call to land, and what ``read_calls`` should give back for it."""

    start: datetime
    latency_ms: int  # unique per data set: it identifies the call in what is read back
    prompts: str | None = "greet/1"
    model: str = "gpt-4o-mini"
    tokens: tuple[int, int] | None = (100, 20)
    ttft_s: float | None = None
    error: bool = False
    test: str | None = "t1"
    variant: str | None = "A"
    app_version: str | None = "1.0"

    def attributes(self, persona: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: "chat",
            sc.GEN_AI_PROVIDER_NAME: "openai",
            sc.GEN_AI_REQUEST_MODEL: self.model,
            sc.GEN_AI_AGENT_NAME: persona,
        }
        if self.tokens is not None:
            attrs[sc.GEN_AI_USAGE_INPUT_TOKENS], attrs[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = self.tokens
        if self.ttft_s is not None:
            attrs[sc.GEN_AI_REQUEST_STREAM] = True
            attrs[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = self.ttft_s
        if self.prompts:
            name, _, version = self.prompts.split(",")[-1].partition("/")
            attrs[sc.GENAI_MLFLOW_PROMPTS] = self.prompts
            attrs[sc.GENAI_MLFLOW_PROMPT_NAME] = name
            attrs[sc.GENAI_MLFLOW_PROMPT_VERSION] = version
        for key, value in (
            (sc.GENAI_MLFLOW_AB_TEST, self.test),
            (sc.GENAI_MLFLOW_VARIANT, self.variant),
            (sc.GENAI_MLFLOW_APP_VERSION, self.app_version),
        ):
            if value is not None:
                attrs[key] = value
        if self.error:
            attrs[sc.ERROR_TYPE] = "RateLimitError"
        return attrs

    def row(self, group: str | None) -> tuple[Any, ...]:
        """(group, ok, latency, input, output, total tokens, ttft, cost), NaN where unknown."""
        inp, out = self.tokens if self.tokens is not None else (NAN, NAN)
        cost = PRICES.cost(self.model, *self.tokens) if self.tokens is not None else None
        if cost is None and self.tokens is None and PRICES.price(self.model) is not None:
            cost_usd = 0.0  # the exporter prices a call without tokens at 0
        else:
            cost_usd = NAN if cost is None else cost.total_cost
        ttft = NAN if self.ttft_s is None else self.ttft_s * 1000
        return (group, not self.error, float(self.latency_ms), inp, out, inp + out, ttft, cost_usd)


def at(days_ago: int, hours: float) -> datetime:
    return TODAY - timedelta(days=days_ago) + timedelta(hours=hours)


# Calls from 5 days ago to today; SINCE (4 days ago) to TODAY leaves out the first and the last.
CALLS = (
    Call(at(5, 10), 1000),  # before the range
    Call(at(3, 6), 1500),
    Call(at(3, 18), 1600, prompts="greet/2", tokens=(200, 40), ttft_s=0.25, variant="B"),
    Call(
        at(2, 9),
        1700,
        prompts="greet/2",
        model="my-local-model",
        tokens=(300, 60),
        variant="B",
        app_version="1.1",
    ),
    Call(at(2, 15), 1800, tokens=None, error=True),
    Call(at(1, 8), 1900, prompts=None, test=None, variant=None, tokens=(50, 5)),  # no prompt, no variant
    Call(at(1, 12), 2000, model="gpt-4.1-mini", tokens=(10, 1), test="t2", variant="X", app_version=None),
    Call(at(1, 20), 2100, prompts="greet/2,sys/3", tokens=(7, 3), test="t2", variant="Y"),
    Call(TODAY + timedelta(seconds=1), 2200),  # at the range's end: left out
)


def land(uri: str, spool_dir: Path, persona: str, calls: Sequence[Call]) -> None:
    """The calls' spans, through the exporter's pipeline, on a tracer provider of this test's own."""
    pipeline = get_pipeline(Settings.resolve(uri, spool_dir=str(spool_dir)))
    provider = TracerProvider()
    attach(pipeline, provider)
    tracer = provider.get_tracer("test_reader")
    try:
        for call in calls:
            start_ns = int(call.start.timestamp() * 1e9)
            span = tracer.start_span(
                f"chat {call.model}", start_time=start_ns, attributes=call.attributes(persona)
            )
            if call.error:
                span.set_status(Status(StatusCode.ERROR, "rate limited"))
            span.end(end_time=start_ns + call.latency_ms * 1_000_000)
        assert pipeline.flush(120)
    finally:
        pipeline.shutdown()
        provider.shutdown()


def rows(calls: Calls) -> list[tuple[Any, ...]]:
    """What was read, as comparable rows sorted by latency (unique per call)."""
    s: Samples = calls.samples
    out = []
    for i in range(len(s)):
        out.append(
            (
                str(s.group[i]),
                bool(s.ok[i]),
                float(s.latency_ms[i]),
                float(s.input_tokens[i]),
                float(s.output_tokens[i]),
                float(s.total_tokens[i]),
                float(s.ttft_ms[i]),
                float(s.cost_usd[i]),
            )
        )
    return sorted(out, key=lambda r: r[2])


def expected(calls: Sequence[Call], group: Any) -> list[tuple[Any, ...]]:
    return sorted((c.row(group(c)) for c in calls), key=lambda r: r[2])


def same(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    """Equal, NaN equal to NaN, floats to 1e-9 relative."""
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        assert g[:2] == w[:2], (g, w)
        for a, b in zip(g[2:], w[2:], strict=True):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9), (g, w)


# ---------------------------------------------------------------------------------------------
# Stores: the embedded one (sqlite in a temp dir) and the test session's server


@pytest.fixture(scope="module")
def server_uri(mlflow_server: MlflowStack) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in mlflow_server.env.items():
            patch.setenv(key, value)
        if not mlflow_server.running:
            mlflow_server.start_mlflow()
        yield mlflow_server.tracking_uri


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("embedded")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # the embedded store puts artifacts under ./mlruns
        yield f"sqlite:///{tmp / 'mlflow.db'}"


@pytest.fixture(scope="module", params=["embedded", "server"])
def uri(request: pytest.FixtureRequest) -> str:
    name = "sqlite_uri" if request.param == "embedded" else "server_uri"
    return str(request.getfixturevalue(name))


@dataclass(frozen=True)
class Landed:
    uri: str
    persona: str


@pytest.fixture(scope="module")
def landed(uri: str, tmp_path_factory: pytest.TempPathFactory) -> Landed:
    """CALLS, landed once per store for the tests that only read them."""
    persona = f"cmp_{uuid.uuid4().hex[:8]}"
    land(uri, tmp_path_factory.mktemp("spool"), persona, CALLS)
    # A persona whose name the first one's LIKE pattern would match, and its comparisons
    # experiment: neither must be read.
    land(uri, tmp_path_factory.mktemp("spool"), persona + "x", [Call(at(2, 10), 9000)])
    from mlflow import MlflowClient

    MlflowClient(uri).create_experiment(
        persona + "_comparisons", tags={sc.GENAI_MLFLOW_COMPARISON_OF: persona}
    )
    return Landed(uri, persona)


IN_RANGE = [c for c in CALLS if SINCE <= c.start < TODAY]


# ---------------------------------------------------------------------------------------------
# What is read


def test_reads_exactly_the_calls_in_range_grouped_by_prompt_version(landed: Landed):
    calls = read_calls(landed.uri, landed.persona, since=SINCE, until=TODAY, by="prompt_version")
    labelled = [c for c in IN_RANGE if c.prompts]
    same(rows(calls), expected(labelled, lambda c: c.prompts))
    assert calls.unlabelled == 1  # the call without a prompt
    days = [(TODAY - timedelta(days=n)).date() for n in (3, 2, 1)]
    assert calls.experiments == [f"{landed.persona}_{d:%Y-%m-%d}" for d in days]
    assert calls.tests == ["t1", "t2"]
    assert (calls.since, calls.until) == (SINCE, TODAY)


def test_the_persona_is_read_as_the_exporter_names_it(landed: Landed):
    calls = read_calls(landed.uri, f"  {landed.persona}\n", since=SINCE, until=TODAY, by="model")
    assert len(calls.samples) == len(IN_RANGE)


def test_the_date_range_includes_the_experiment_of_until_but_not_its_later_calls(landed: Landed):
    calls = read_calls(landed.uri, landed.persona, since=SINCE, until=TODAY + timedelta(hours=1), by="model")
    assert calls.experiments[-1] == f"{landed.persona}_{TODAY:%Y-%m-%d}"
    want = [*IN_RANGE, CALLS[-1]]
    same(rows(calls), expected(want, lambda c: c.model))
    assert calls.unlabelled == 0


def test_the_time_range_cuts_within_a_day(landed: Landed):
    since, until = at(3, 12), at(1, 10)  # naive datetimes are UTC, too
    calls = read_calls(
        landed.uri,
        landed.persona,
        since=since.replace(tzinfo=None),
        until=until.replace(tzinfo=None),
        by="app_version",
        workers=2,
    )
    inside = [c for c in CALLS if since <= c.start < until]
    assert [c.latency_ms for c in inside] == [1600, 1700, 1800, 1900]
    same(rows(calls), expected(inside, lambda c: c.app_version))
    assert calls.since == since


def test_by_variant_needs_a_test_when_the_calls_hold_several(landed: Landed):
    with pytest.raises(AmbiguousTestError, match=r"2 A/B tests \(t1, t2\); pass --test") as caught:
        read_calls(landed.uri, landed.persona, since=SINCE, until=TODAY, by="variant")
    assert isinstance(caught.value, ValueError)
    calls = read_calls(landed.uri, landed.persona, since=SINCE, until=TODAY, by="variant", test="t2")
    same(rows(calls), expected([c for c in IN_RANGE if c.test == "t2"], lambda c: c.variant))
    assert calls.tests == ["t2"]
    assert calls.unlabelled == 0
    one_test = read_calls(landed.uri, landed.persona, since=SINCE, until=at(1, 0), by="variant")
    assert sorted(set(one_test.samples.group)) == ["A", "B"]
    assert one_test.tests == ["t1"]


def test_a_test_filter_applies_to_any_grouping(landed: Landed):
    calls = read_calls(landed.uri, landed.persona, since=SINCE, until=TODAY, by="model", test="t1")
    same(rows(calls), expected([c for c in IN_RANGE if c.test == "t1"], lambda c: c.model))
    nothing = read_calls(landed.uri, landed.persona, since=SINCE, until=TODAY, by="model", test="none")
    assert len(nothing.samples) == 0
    assert nothing.unlabelled == 0


def test_no_experiment_in_range_says_which_dates_exist(landed: Landed):
    since = TODAY - timedelta(days=30)
    with pytest.raises(CompareError) as caught:
        read_calls(landed.uri, landed.persona, since=since, until=since + timedelta(days=2), by="model")
    message = str(caught.value)
    assert f"no experiment of persona '{landed.persona}' from {since:%Y-%m-%d} to " in message
    dates = [f"{TODAY - timedelta(days=n):%Y-%m-%d}" for n in (5, 3, 2, 1, 0)]
    assert message.endswith(f"it has calls on 5 other date(s): {', '.join(dates)}")
    with pytest.raises(CompareError, match=r"no experiment of this persona at all"):
        read_calls(landed.uri, "nobody_" + landed.persona, since=SINCE, until=TODAY, by="model")


def test_slices_that_fill_their_pages_are_cut_and_every_call_is_read_once(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Pages of 5: one day of 48 calls, a dozen of them in the same millisecond, is cut into
    slices, and the millisecond is paged by offset."""
    persona = f"cmp_pages_{uuid.uuid4().hex[:8]}"
    base = at(2, 0)
    calls = [Call(base + timedelta(minutes=17 * i), 3000 + i, prompts=f"p/{i % 3}") for i in range(36)]
    crowded = at(2, 11)
    calls += [Call(crowded, 4000 + i, prompts=f"p/{i % 3}") for i in range(12)]
    land(uri, tmp_path / "spool", persona, calls)
    source = reader._RestSource if uri.startswith("http") else reader._StoreSource
    monkeypatch.setattr(source, "page_size", 5)
    searched: list[int] = []
    original = source.search

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        searched.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(source, "search", counted)
    got = read_calls(uri, persona, since=SINCE, until=TODAY, by="prompt_version", workers=4)
    same(rows(got), expected(calls, lambda c: c.prompts))
    assert len(searched) >= 48 / 5


def test_quotes_in_the_persona_and_the_test_name(uri: str, tmp_path: Path):
    """MLflow's filters have no escapes: a single quote goes in double quotes, both in a LIKE."""
    tag = uuid.uuid4().hex[:6]
    single, both = f"O'Brien {tag}", f'say "it\'s" {tag}'
    quoted = Call(at(1, 9), 5000, test="Bob's test")
    land(uri, tmp_path / "a", single, [quoted, replace(quoted, latency_ms=5001, test="other")])
    land(uri, tmp_path / "b", both, [replace(quoted, latency_ms=5002, test='the "it\'s" test')])
    calls = read_calls(uri, single, since=SINCE, until=TODAY, by="variant", test="Bob's test")
    same(rows(calls), expected([quoted], lambda c: c.variant))
    calls = read_calls(uri, both, since=SINCE, until=TODAY, by="variant", test='the "it\'s" test')
    assert [float(x) for x in calls.samples.latency_ms] == [5002.0]


# ---------------------------------------------------------------------------------------------
# Errors


def test_an_unknown_grouping_is_refused():
    with pytest.raises(CompareError, match=r"cannot group by 'prompt'; choose one of prompt_version, model"):
        read_calls("http://127.0.0.1:1", "p", since=SINCE, until=TODAY, by="prompt")


def test_an_unreachable_server_is_named_with_the_cause():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        CompareError, match=rf"cannot reach MLflow at {re.escape(uri)}: .*(refused|Max retries)"
    ):
        read_calls(uri, "p", since=SINCE, until=TODAY, by="model")


def test_a_server_that_is_not_mlflow_is_named():
    class Page(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>sign in</html>")

        def log_message(self, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Page) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            with pytest.raises(
                CompareError, match=rf"MLflow at {re.escape(uri)}: .* did not answer with JSON"
            ):
                read_calls(uri, "p", since=SINCE, until=TODAY, by="model")
        finally:
            httpd.shutdown()


def test_a_missing_database_is_not_created(tmp_path: Path):
    path = tmp_path / "none.db"
    with pytest.raises(CompareError, match=r"no MLflow database at sqlite:///"):
        read_calls(f"sqlite:///{path}", "p", since=SINCE, until=TODAY, by="model")
    assert not path.exists()


def test_an_empty_time_range_is_refused():
    with pytest.raises(CompareError, match=r"empty time range"):
        read_calls("sqlite:///x.db", "p", since=TODAY, until=TODAY, by="model")


# ---------------------------------------------------------------------------------------------
# Slicing, on a store in memory: every trace once, whatever the timestamps


class FakeSource(reader._Source):
    """Traces as (timestamp, latency); filters are the reader's time bounds; tokens are offsets."""

    def __init__(self, traces: list[tuple[int, int]], page_size: int) -> None:
        # MLflow's order: newest first, then by id (here the latency).
        self.traces = sorted(traces, key=lambda t: (-t[0], t[1]))
        self.page_size = page_size
        self.workers = 4
        self.requests = 0

    def search(self, experiment_id: str, filter_string: str, token: str | None, tag: str, full: bool) -> Any:
        self.requests += 1
        lows = [int(v) for v in re.findall(r"timestamp_ms >= (\d+)", filter_string)]
        highs = [int(v) for v in re.findall(r"timestamp_ms < (\d+)", filter_string)]
        inside = [t for t in self.traces if max(lows) <= t[0] < min(highs)]
        offset = int(token or 0)
        page = inside[offset : offset + self.page_size]
        more = offset + self.page_size < len(inside) or (len(page) == self.page_size)
        rows = [("g", None, True, float(lat), NAN, NAN, NAN, NAN, NAN) for _, lat in page]
        result = reader._Page(rows, str(offset + self.page_size) if more and page else None)
        if full and result.next_token:
            result.newest_ms, result.oldest_ms = page[0][0], page[-1][0]
            result.oldest_count = sum(1 for t in page if t[0] == page[-1][0])
        return result


@pytest.mark.parametrize(
    "timestamps",
    [
        [1000 + 7 * i for i in range(1000)],  # even
        [1000] * 23 + [1001] * 9 + [5000 + i for i in range(40)],  # crowded milliseconds
        [86_400_000 - 1] * 30 + [0] * 30,  # at the edges of the day
        [int(86_400_000 * (i / 300) ** 4) for i in range(300)],  # bursty
    ],
)
def test_slicing_reads_every_trace_once(timestamps: list[int]):
    traces = [(ts, i) for i, ts in enumerate(timestamps)]
    source = FakeSource(traces, page_size=10)
    first = reader._Slice("1", 0, 86_400_000, 0)
    got = reader._Reader(source, "tag").read([first])
    assert sorted(int(r[3]) for r in got) == list(range(len(traces)))
    # Cut by a guess of the rate: crowded or bursty times cost empty slices, never a runaway.
    assert source.requests <= 20 * (len(traces) // 10 + 1)
