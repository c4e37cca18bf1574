"""A comparison for people and scripts: a text table, JSON, a chart (PNG) and run metrics."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .publish import metric_key
from .stats import Comparison, Difference, GroupSummary, Stats

# Rows of the table: label, and how to read it off a group's summary.
_Row = tuple[str, Callable[[GroupSummary], str]]


@dataclass(frozen=True)
class Scope:
    """What was compared: for the report's header, its JSON and the logged run's params."""

    persona: str
    by: str
    since: datetime
    until: datetime
    experiments: Sequence[str]
    unlabelled: int  # calls in the period without the grouping label, left out
    test: str | None = None  # the A/B test, when comparing variants


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _stats(stats: Stats, key: str, digits: int = 0) -> str:
    return _num(getattr(stats, key), digits)


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}" if value < 1 else f"${value:,.2f}"


_ROWS: tuple[_Row, ...] = (
    ("calls", lambda g: f"{g.calls:,}"),
    ("error rate", lambda g: f"{g.error_rate:.1%} ({g.errors:,})"),
    ("input tokens mean", lambda g: _stats(g.input_tokens, "mean", 1)),
    (
        "input tokens p50 / p95",
        lambda g: f"{_stats(g.input_tokens, 'p50')} / {_stats(g.input_tokens, 'p95')}",
    ),
    ("output tokens mean", lambda g: _stats(g.output_tokens, "mean", 1)),
    (
        "output tokens p50 / p95",
        lambda g: f"{_stats(g.output_tokens, 'p50')} / {_stats(g.output_tokens, 'p95')}",
    ),
    ("total tokens mean", lambda g: _stats(g.total_tokens, "mean", 1)),
    (
        "total tokens p50 / p95",
        lambda g: f"{_stats(g.total_tokens, 'p50')} / {_stats(g.total_tokens, 'p95')}",
    ),
    ("latency p50 / p95 (ms)", lambda g: f"{_stats(g.latency_ms, 'p50')} / {_stats(g.latency_ms, 'p95')}"),
    (
        "first token p50 / p95 (ms)",
        lambda g: f"{_stats(g.ttft_ms, 'p50')} / {_stats(g.ttft_ms, 'p95')} ({g.ttft_ms.count:,} streamed)",
    ),
    ("cost per call", lambda g: _usd(g.cost.mean_usd)),
    (
        "cost total",
        lambda g: (
            _usd(g.cost.total_usd)
            + (f" ({g.cost.unpriced_calls:,} unpriced)" if g.cost.unpriced_calls else "")
        ),
    ),
)

_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_METRIC_LABELS = {
    "error_rate": "error rate",
    "input_tokens.mean": "input tokens (mean)",
    "output_tokens.mean": "output tokens (mean)",
    "total_tokens.mean": "total tokens (mean)",
    "latency_ms.p50": "latency p50",
    "latency_ms.p95": "latency p95",
    "ttft_ms.p50": "first token p50",
    "cost_usd.mean": "cost per call",
}


def _header(scope: Scope) -> list[str]:
    period = f"{scope.since:%Y-%m-%d %H:%M} to {scope.until:%Y-%m-%d %H:%M} UTC"
    by = f"{scope.by} (A/B test {scope.test!r})" if scope.test else scope.by
    lines = [
        f"Persona {scope.persona!r}, by {by}, {period}",
        f"read from {len(scope.experiments)} experiment(s): {', '.join(scope.experiments)}",
    ]
    if scope.unlabelled:
        lines.append(f"{scope.unlabelled:,} call(s) in the period carry no {scope.by} and are left out")
    return lines


def render_text(comparison: Comparison, scope: Scope) -> str:
    groups = comparison.groups
    names = [g.group + (" (baseline)" if g.group == comparison.baseline else "") for g in groups]
    cells = [[label, *(read(g) for g in groups)] for label, read in _ROWS]
    header = ["", *names]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    table = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *cells]
    ]
    lines = [*_header(scope), "", *table]
    others = [g.group for g in groups if g.group != comparison.baseline]
    for group in others:
        lines += ["", f"{group} against {comparison.baseline}:"]
        for diff in comparison.differences:
            if diff.group == group:
                mark = "*" if diff.significant else " "
                lines.append(f" {mark} {_METRIC_LABELS.get(diff.metric, diff.metric):<21} {diff.verdict}")
    if others and comparison.tests:
        lines += [
            "",
            f"* significant; intervals and decisions corrected for {comparison.tests} tests "
            f"(Holm), bootstrap with {comparison.resamples:,} resamples, seed {comparison.seed}.",
        ]
    lines += ["", f"Verdict: {comparison.summary_verdict}"]
    return "\n".join(lines) + "\n"


def report_dict(comparison: Comparison, scope: Scope) -> dict[str, Any]:
    return {
        "persona": scope.persona,
        "by": scope.by,
        "test": scope.test,
        "since": scope.since.isoformat(),
        "until": scope.until.isoformat(),
        "experiments": list(scope.experiments),
        "unlabelled_calls": scope.unlabelled,
        **comparison.to_dict(),
    }


def run_metrics(comparison: Comparison) -> dict[str, float]:
    """Each group's figures as ``<group>.<figure>`` metrics, for the logged run."""
    metrics: dict[str, float] = {}
    for g in comparison.groups:
        figures: dict[str, float | None] = {
            "calls": float(g.calls),
            "error_rate": g.error_rate,
            "input_tokens_mean": g.input_tokens.mean,
            "output_tokens_mean": g.output_tokens.mean,
            "total_tokens_mean": g.total_tokens.mean,
            "latency_ms_p50": g.latency_ms.p50,
            "latency_ms_p95": g.latency_ms.p95,
            "ttft_ms_p50": g.ttft_ms.p50,
            "cost_usd_mean": g.cost.mean_usd,
        }
        for figure, value in figures.items():
            if value is not None:
                metrics[metric_key(g.group, figure)] = value
    return metrics


def chart_png(comparison: Comparison) -> bytes | None:
    """Each group's difference from the baseline, metric by metric, as a share of the baseline
    with its interval; None when there is nothing to compare."""
    diffs = [d for d in comparison.differences if d.relative is not None and d.ci is not None]
    if not diffs:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display here, and none needed
    from matplotlib import pyplot as plt

    metrics = [m for m in _METRIC_LABELS if any(d.metric == m for d in diffs)]
    groups = list(dict.fromkeys(d.group for d in diffs))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(metrics) * max(1, len(groups) * 0.6)))
    step = 0.8 / max(1, len(groups))
    for gi, group in enumerate(groups):
        for mi, metric in enumerate(metrics):
            diff = next((d for d in diffs if d.group == group and d.metric == metric), None)
            if diff is None:
                continue
            y = mi + (gi - (len(groups) - 1) / 2) * step
            low, high = (_relative(diff, bound) for bound in diff.ci)  # type: ignore[union-attr]
            value = 100.0 * (diff.relative or 0.0)
            color = ("tab:red" if value > 0 else "tab:green") if diff.significant else "tab:gray"
            ax.errorbar(
                value,
                y,
                xerr=[[max(0.0, value - low)], [max(0.0, high - value)]],
                fmt=_MARKERS[gi % len(_MARKERS)],
                color=color,
                capsize=3,
            )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(metrics)), [_METRIC_LABELS[m] for m in metrics])
    ax.invert_yaxis()
    ax.set_xlabel(f"difference from {comparison.baseline} (% of its value; lower is better)")
    ax.set_title(
        "Red: significantly worse; green: significantly better; gray: no clear difference", fontsize=9
    )
    if len(groups) > 1:  # colours say significance, so markers say which group
        for gi, group in enumerate(groups):
            ax.plot([], [], _MARKERS[gi % len(_MARKERS)], color="black", label=group)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _relative(diff: Difference, bound: float) -> float:
    base = diff.baseline_value or 0.0
    return 100.0 * bound / base if base else 0.0
