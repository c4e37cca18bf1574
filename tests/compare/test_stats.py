"""The statistics of ``genai-mlflow compare``: right answers on known data, silence on A/A data."""

from __future__ import annotations

import json
import math
import re
from statistics import NormalDist

import numpy as np
import pytest

from genai_mlflow.compare.stats import (
    Comparison,
    Difference,
    Samples,
    bootstrap_mean,
    bootstrap_quantile,
    compare,
    holm,
    quantile,
)

IN_PRICE, OUT_PRICE = 2.5e-6, 1e-5
Z95 = NormalDist().inv_cdf(0.95)


def _calls(
    name: str,
    n: int,
    seed: int,
    *,
    output_mean: float = 200,
    latency_median: float = 800,
    latency_sigma: float = 0.5,
    error_rate: float = 0.02,
    ttft_median: float = 300,
    streamed: float = 0.5,
    priced: float = 0.9,
) -> dict[str, np.ndarray]:
    """``n`` calls of one group: Poisson token counts, lognormal latency and time to first token (on
    streamed calls only) and a cost from the token counts (on priced calls only)."""
    rng = np.random.default_rng(seed)
    input_tokens = rng.poisson(500, n).astype(float)
    output_tokens = rng.poisson(output_mean, n).astype(float)
    return {
        "group": np.full(n, name, dtype=object),
        "ok": rng.random(n) >= error_rate,
        "latency_ms": rng.lognormal(math.log(latency_median), latency_sigma, n),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "ttft_ms": np.where(rng.random(n) < streamed, rng.lognormal(math.log(ttft_median), 0.4, n), np.nan),
        "cost_usd": np.where(
            rng.random(n) < priced, input_tokens * IN_PRICE + output_tokens * OUT_PRICE, np.nan
        ),
    }


def _samples(*groups: dict[str, np.ndarray]) -> Samples:
    return Samples(**{column: np.concatenate([group[column] for group in groups]) for column in groups[0]})


def _by_metric(comparison: Comparison, group: str) -> dict[str, Difference]:
    return {d.metric: d for d in comparison.differences if d.group == group}


def test_known_differences_are_found_with_the_right_sign_and_intervals_that_hold_the_truth() -> None:
    a = _calls("prompt/1", 2000, seed=1)
    b = _calls(
        "prompt/2", 2000, seed=2, output_mean=260, latency_median=1000, error_rate=0.10, ttft_median=250
    )
    comparison = compare(_samples(a, b))

    assert comparison.baseline == "prompt/1"
    assert comparison.tests == 8
    assert comparison.interval_confidence == pytest.approx(1 - 0.05 / 8)
    p95_factor = math.exp(Z95 * 0.5)  # a lognormal's p95 is its median times exp(z95 * sigma)
    truth = {
        "error_rate": 0.08,
        "input_tokens.mean": 0.0,
        "output_tokens.mean": 60.0,
        "total_tokens.mean": 60.0,
        "latency_ms.p50": 200.0,
        "latency_ms.p95": 200.0 * p95_factor,
        "ttft_ms.p50": -50.0,
        "cost_usd.mean": 60 * OUT_PRICE,
    }
    differences = _by_metric(comparison, "prompt/2")
    assert set(differences) == set(truth)
    for metric, true_difference in truth.items():
        difference = differences[metric]
        assert difference.ci is not None, metric
        assert difference.ci[0] <= true_difference <= difference.ci[1], (metric, difference.ci)
        if true_difference == 0:
            assert not difference.significant
            assert difference.verdict.startswith("no clear difference (95% CI ")
        else:
            assert difference.significant, metric
            assert difference.p_adjusted is not None and difference.p_adjusted <= 0.05
            assert np.sign(difference.absolute) == np.sign(true_difference)
            assert difference.verdict.startswith("higher: +" if true_difference > 0 else "lower: -"), metric

    assert differences["latency_ms.p50"].verdict.endswith(" ms")
    assert "% CI +" in differences["latency_ms.p50"].verdict
    assert "percentage points" in differences["error_rate"].verdict
    assert comparison.summary_verdict == (
        "prompt/2 is better than prompt/1 on p50 time to first token but worse on error rate, "
        "output tokens, total tokens, p50 latency, p95 latency, cost per call."
    )


def test_same_distribution_in_both_groups_reports_no_difference() -> None:
    """A/A: Holm's adjustment keeps the chance of any false alarm, over all 8 tests, near 5%."""
    seeds_with_a_false_alarm = 0
    for seed in range(20):
        samples = _samples(_calls("a", 300, seed=2 * seed), _calls("b", 300, seed=2 * seed + 1))
        comparison = compare(samples, seed=seed)
        assert comparison.tests == 8
        if any(d.significant for d in comparison.differences):
            seeds_with_a_false_alarm += 1
        if seed == 0:
            assert comparison.summary_verdict == "No clear difference from a yet."
            assert all(d.verdict.startswith("no clear difference") for d in comparison.differences)
    assert seeds_with_a_false_alarm <= 2


def test_summary_names_each_group_that_differs_and_those_that_do_not() -> None:
    samples = _samples(
        _calls("a", 400, seed=1),
        _calls("b", 400, seed=2, latency_median=1300),
        _calls("c", 400, seed=3),
        _calls("d", 10, seed=4),
    )
    comparison = compare(samples)

    assert comparison.tests == 16  # d has too few calls for any test
    assert comparison.summary_verdict == (
        "b is worse than a on p50 latency, p95 latency; no clear difference for c; not enough data yet for d."
    )


def test_small_groups_say_not_enough_data() -> None:
    comparison = compare(_samples(_calls("v1", 12, seed=1), _calls("v2", 9, seed=2)))

    assert comparison.tests == 0
    assert comparison.interval_confidence is None
    error_rate = _by_metric(comparison, "v2")["error_rate"]
    assert error_rate.verdict == "not enough data yet: 12 and 9 calls; at least 30 per group are needed"
    for difference in comparison.differences:
        assert difference.verdict.startswith("not enough data yet: ")
        assert difference.ci is None and difference.p_value is None and not difference.significant
    assert comparison.summary_verdict == (
        "Not enough data yet to compare with v1: at least 30 calls per group are needed."
    )


def test_a_metric_with_fewer_than_two_values_is_reported_not_dropped() -> None:
    comparison = compare(
        _samples(_calls("a", 50, seed=1), _calls("b", 50, seed=2, streamed=0.0)), min_calls=0
    )

    ttft = _by_metric(comparison, "b")["ttft_ms.p50"]
    assert ttft.ci is None and ttft.value is None and ttft.count == 0
    assert ttft.verdict.endswith(
        f"{ttft.baseline_count} and 0 streamed calls; at least 2 per group are needed"
    )
    assert comparison.tests == 7


def test_baseline_is_the_busiest_group_unless_given() -> None:
    three = _samples(_calls("b", 40, seed=1), _calls("a", 40, seed=2), _calls("c", 50, seed=3))
    assert compare(three).baseline == "c"

    tie = _samples(_calls("b", 40, seed=1), _calls("a", 40, seed=2))
    assert compare(tie).baseline == "a"
    assert compare(tie, baseline="b").baseline == "b"
    with pytest.raises(ValueError, match="'z' is not among the groups: a, b"):
        compare(tie, baseline="z")


def test_groups_come_baseline_first_then_by_name() -> None:
    samples = _samples(_calls("gpt-c", 30, seed=1), _calls("gpt-a", 30, seed=2), _calls("gpt-b", 60, seed=3))
    comparison = compare(samples)

    assert [g.group for g in comparison.groups] == ["gpt-b", "gpt-a", "gpt-c"]
    assert [d.group for d in comparison.differences] == ["gpt-a"] * 8 + ["gpt-c"] * 8


def test_time_to_first_token_counts_streamed_calls_and_cost_leaves_out_unpriced_ones() -> None:
    rows = [
        {"group": "g", "ok": True, "latency_ms": 900.0, "ttft_ms": 100.0, "cost_usd": 0.01},
        {"group": "g", "ok": False, "latency_ms": 300.0, "ttft_ms": None, "cost_usd": None},
        {"group": "g", "ok": True, "latency_ms": 500.0, "ttft_ms": 300.0, "cost_usd": 0.03},
        {"group": "g", "latency_ms": 700.0, "ttft_ms": float("nan")},
    ]
    (summary,) = compare(Samples.from_rows(rows)).groups

    assert (summary.calls, summary.errors, summary.error_rate) == (4, 1, 0.25)
    assert (summary.ttft_ms.count, summary.ttft_ms.p50, summary.ttft_ms.mean) == (2, 100.0, 200.0)
    assert (summary.latency_ms.p50, summary.latency_ms.p95) == (500.0, 900.0)
    assert (summary.cost.priced_calls, summary.cost.unpriced_calls) == (2, 2)
    assert summary.cost.mean_usd == pytest.approx(0.02)
    assert summary.cost.total_usd == pytest.approx(0.04)
    assert summary.input_tokens.count == 0
    assert summary.input_tokens.mean is None and summary.input_tokens.p95 is None


def test_one_group_has_nothing_to_compare() -> None:
    comparison = compare(_samples(_calls("only", 100, seed=1)))

    assert [g.group for g in comparison.groups] == ["only"]
    assert comparison.differences == ()
    assert comparison.summary_verdict == "Only one group (only): nothing to compare."


def test_a_seed_gives_the_same_result_every_time() -> None:
    samples = _samples(_calls("a", 200, seed=1), _calls("b", 200, seed=2, latency_median=900))

    first = compare(samples, seed=7)
    assert compare(samples, seed=7).to_dict() == first.to_dict()
    other = compare(samples, seed=8)
    assert [d.ci for d in other.differences] != [d.ci for d in first.differences]
    assert [d.absolute for d in other.differences] == [d.absolute for d in first.differences]


def test_to_dict_survives_a_json_round_trip_without_nan() -> None:
    samples = _samples(_calls("a", 60, seed=1, streamed=0.0, priced=0.0), _calls("b", 5, seed=2))
    as_dict = compare(samples).to_dict()

    text = json.dumps(as_dict, allow_nan=False)
    assert json.loads(text) == as_dict
    assert as_dict["groups"][0]["ttft_ms"] == {"count": 0, "mean": None, "p50": None, "p95": None}
    assert as_dict["groups"][0]["cost"]["total_usd"] is None
    assert as_dict["differences"][0]["ci"] is None


def test_the_calls_needed_estimate_delivers_the_promised_interval() -> None:
    """With the N calls a "no clear difference" verdict asks for, the interval's half-width is about
    the change it names (10% of the baseline)."""

    def noisy_latency(n: int, seed: int) -> Samples:
        return _samples(
            *(_calls(name, n, 2 * seed + i, latency_sigma=1.0, streamed=1) for i, name in enumerate("ab"))
        )

    small = _by_metric(compare(noisy_latency(100, seed=0)), "b")["latency_ms.p50"]
    promise = re.search(
        r"; about ([\d,]+) calls per group would detect a change of ([\d.]+) ms \(10%\)$", small.verdict
    )
    assert promise is not None, small.verdict
    calls, change = int(promise[1].replace(",", "")), float(promise[2])
    assert small.baseline_value is not None
    assert change == pytest.approx(0.1 * small.baseline_value, rel=0.01)

    large = _by_metric(compare(noisy_latency(calls, seed=100)), "b")["latency_ms.p50"]
    assert large.ci is not None
    assert 0.7 < (large.ci[1] - large.ci[0]) / 2 / change < 1.4


def test_100k_calls_per_group() -> None:
    """The histogram bootstrap is what makes this practical (well under 2 s); here just that it runs."""
    comparison = compare(
        _samples(
            _calls("a", 100_000, seed=1), _calls("b", 100_000, seed=2, latency_median=810, output_mean=201)
        )
    )

    assert comparison.tests == 8
    differences = _by_metric(comparison, "b")
    assert differences["latency_ms.p50"].significant
    assert differences["output_tokens.mean"].significant
    assert not differences["input_tokens.mean"].significant


@pytest.mark.parametrize(
    ("values", "resamples"),
    [
        # Few unique values: one histogram bin per value.
        (np.random.default_rng(11).poisson(40, 300).astype(float), 10_000),
        # Heavy-tailed and all distinct: equal-count bins.
        (np.random.default_rng(12).lognormal(0, 1.5, 3000), 3000),
    ],
)
def test_histogram_bootstrap_agrees_with_resampling_indices(values: np.ndarray, resamples: int) -> None:
    indices = np.random.default_rng(1).integers(0, values.size, (resamples, values.size))
    resampled = values[indices]
    naive = {
        "mean": resampled.mean(axis=1),
        "p50": np.quantile(resampled, 0.5, axis=1, method="inverted_cdf"),
        "p95": np.quantile(resampled, 0.95, axis=1, method="inverted_cdf"),
    }
    fast = {
        "mean": bootstrap_mean(values, resamples, np.random.default_rng(2)),
        "p50": bootstrap_quantile(values, 0.5, resamples, np.random.default_rng(3)),
        "p95": bootstrap_quantile(values, 0.95, resamples, np.random.default_rng(4)),
    }
    for statistic, expected in naive.items():
        expected_ci = np.quantile(expected, [0.025, 0.975])
        width = expected_ci[1] - expected_ci[0]
        assert np.abs(np.quantile(fast[statistic], [0.025, 0.975]) - expected_ci).max() < 0.1 * width, (
            statistic
        )


@pytest.mark.parametrize("n", [1, 2, 19, 20, 100, 101])
@pytest.mark.parametrize("q", [0.5, 0.95])
def test_quantile_is_numpys_inverted_cdf(n: int, q: float) -> None:
    values = np.sort(np.random.default_rng(n).normal(size=n))
    assert quantile(values, q) == np.quantile(values, q, method="inverted_cdf")


def test_holm_adjusts_in_step_down_order() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
