"""``genai-mlflow compare``: read a persona's calls from MLflow, compare the groups, print the
table and verdicts (text or JSON) and log them to MLflow as a run with the chart."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from genai_mlflow.exporter.records import normalise_persona

from . import report
from .publish import comparisons_experiment, log_comparison
from .reader import GROUP_TAGS, CompareError, as_utc, read_calls
from .stats import Comparison, compare

_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime) -> datetime:
    """``7d``, ``24h``, ``30m``, ``2w`` before ``now``, or an ISO date or time (UTC unless it
    says otherwise)."""
    found = _PERIOD.match(text)
    if found:
        return now - timedelta(**{_UNITS[found.group(2)]: float(found.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CompareError(
            f"cannot read the time {text!r}: give a period before now (30m, 24h, 7d, 2w) "
            "or an ISO date or time (2026-11-20, 2026-11-20T08:00)"
        ) from None
    return as_utc(moment)


def add_parser(commands: Any, after_command: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "compare",
        parents=[after_command],
        help="which prompt version, model or A/B variant is better, from what landed in MLflow",
    )
    parser.add_argument("--persona", required=True, help="the persona whose calls to compare")
    parser.add_argument("--since", default="7d", help="start: 7d, 24h, 30m, 2w or an ISO date/time (7d)")
    parser.add_argument("--until", default=None, help="end, in the same forms (now)")
    parser.add_argument("--by", choices=sorted(GROUP_TAGS), default="prompt_version", help="grouping")
    parser.add_argument("--test", help="with --by variant: the A/B test (needed when there are several)")
    parser.add_argument("--baseline", help="the group the others are compared with (the largest)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output (text)")
    parser.add_argument("--confidence", type=float, default=0.95, help="for the intervals (0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed, for repeatable answers (0)")
    parser.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")


def run(args: argparse.Namespace, tracking_uri: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        now = datetime.now(UTC)
        since = parse_time(args.since, now)
        until = parse_time(args.until, now) if args.until else now
        if since >= until:
            raise CompareError(
                f"--since ({since:%Y-%m-%d %H:%M}) must be before --until ({until:%Y-%m-%d %H:%M})"
            )
        if not 0.5 <= args.confidence < 1:
            raise CompareError(f"--confidence must be at least 0.5 and below 1, got {args.confidence}")
        persona = normalise_persona(args.persona)
        calls = read_calls(tracking_uri, persona, since=since, until=until, by=args.by, test=args.test)
        if not len(calls.samples):
            raise CompareError(
                f"no call of persona {persona!r} between {since:%Y-%m-%d %H:%M} and {until:%Y-%m-%d %H:%M} "
                f"UTC carries a {args.by} ({calls.unlabelled:,} calls without one)"
            )
        groups = set(calls.samples.group.tolist())
        if args.baseline is not None and args.baseline not in groups:
            raise CompareError(
                f"--baseline {args.baseline!r} is not a group; the groups are {sorted(groups)}"
            )
        comparison = compare(
            calls.samples, baseline=args.baseline, confidence=args.confidence, seed=args.seed
        )
    except (CompareError, ValueError) as exc:
        print(f"genai-mlflow compare: {exc}", file=sys.stderr)
        return 2
    test = args.test or (calls.tests[0] if args.by == "variant" and calls.tests else None)
    scope = report.Scope(persona, args.by, since, until, calls.experiments, calls.unlabelled, test)
    text = report.render_text(comparison, scope)
    document = report.report_dict(comparison, scope)
    logged: dict[str, str] | None = None
    failed = False
    if not args.no_log:
        try:
            logged = _log(tracking_uri, comparison, scope, text, document)
        except Exception as exc:  # the answer stands; say that it was not kept
            print(f"genai-mlflow compare: could not log the comparison to MLflow: {exc}", file=sys.stderr)
            failed = True
    if args.format == "json":
        print(json.dumps({**document, "mlflow_run": logged}, indent=2), file=out)
    else:
        out.write(text)
        if logged is not None:
            print(
                f"\nLogged to MLflow: experiment {logged['experiment_name']!r}, run {logged['run_id']}",
                file=out,
            )
    return 1 if failed else 0


def _log(
    tracking_uri: str, comparison: Comparison, scope: report.Scope, text: str, document: dict[str, Any]
) -> dict[str, str]:
    params = {
        "persona": scope.persona,
        "by": scope.by,
        "since": scope.since.isoformat(),
        "until": scope.until.isoformat(),
        "baseline": comparison.baseline,
        "groups": ",".join(g.group for g in comparison.groups),
        "confidence": str(comparison.confidence),
        "resamples": str(comparison.resamples),
        "seed": str(comparison.seed),
        "tests": str(comparison.tests),
    }
    if scope.test:
        params["test"] = scope.test
    files: dict[str, str | bytes] = {
        "comparison.txt": text,
        "comparison.json": json.dumps(document, indent=2),
    }
    chart = report.chart_png(comparison)
    if chart is not None:
        files["comparison.png"] = chart
    others = [g.group for g in comparison.groups if g.group != comparison.baseline]
    run_name = f"{scope.by}: {' vs '.join([comparison.baseline, *others])}"[:250]
    experiment_id, run_id = log_comparison(
        tracking_uri, scope.persona, run_name, params, report.run_metrics(comparison), files
    )
    return {
        "experiment_name": comparisons_experiment(scope.persona),
        "experiment_id": experiment_id,
        "run_id": run_id,
    }
