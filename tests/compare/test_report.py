"""The comparison's chart, run metrics and time arguments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from genai_mlflow.compare import report
from genai_mlflow.compare.command import parse_time
from genai_mlflow.compare.reader import CompareError
from genai_mlflow.compare.stats import Samples, compare

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _samples(groups: dict[str, float]) -> Samples:
    rng = np.random.default_rng(0)
    rows = [
        {"group": group, "latency_ms": float(rng.lognormal(np.log(median), 0.3)), "output_tokens": 100.0}
        for group, median in groups.items()
        for _ in range(60)
    ]
    return Samples.from_rows(rows)


def test_chart_is_a_png_with_one_marker_per_group_and_none_for_a_single_group():
    png = report.chart_png(compare(_samples({"a": 800, "b": 1000, "c,d": 800})))
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.chart_png(compare(_samples({"only": 800}))) is None


def test_run_metrics_name_each_groups_figures_with_keys_mlflow_accepts():
    metrics = report.run_metrics(compare(_samples({"greeting/1": 800, "x,y": 900})))
    assert metrics["greeting/1.calls"] == 60
    assert metrics["x_y.calls"] == 60
    assert "greeting/1.ttft_ms_p50" not in metrics  # nothing was streamed: no figure, not a zero


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("24h", NOW - timedelta(hours=24)),
        ("30m", NOW - timedelta(minutes=30)),
        ("2w", NOW - timedelta(weeks=2)),
        ("1.5d", NOW - timedelta(hours=36)),
        ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
        ("2026-11-20T08:00+01:00", datetime(2026, 11, 20, 7, tzinfo=UTC)),
    ],
)
def test_times_are_periods_before_now_or_iso_dates(text: str, expected: datetime):
    assert parse_time(text, NOW) == expected


def test_an_unreadable_time_says_which_forms_work():
    with pytest.raises(CompareError, match=r"cannot read the time '7 days'.*30m, 24h, 7d, 2w"):
        parse_time("7 days", NOW)
