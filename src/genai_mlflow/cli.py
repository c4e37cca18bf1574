"""The ``genai-mlflow`` command: ``demo``, ``doctor``, ``spool status|replay``, ``collector``,
``compare`` and ``stack``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from genai_mlflow import stack
from genai_mlflow.compare import command as compare
from genai_mlflow.config import ConfigError, Settings


def _spool(args: argparse.Namespace) -> int:
    from genai_mlflow.exporter.spool import Spool

    settings = Settings.resolve(args.tracking_uri, spool_dir=args.spool_dir)
    if args.action == "status":
        spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes)
        try:
            status = spool.status()
        finally:
            spool.close()
        print(f"spool {status.directory} (for {settings.tracking_uri})")
        print(
            f"  records waiting: {status.pending_records} in {status.segments} segments, {status.bytes} bytes"
        )
        print(f"  dropped: {status.dropped}; live writers: {status.live_writers}")
        print(f"  drained by another process now: {'yes' if status.drain_locked_by_other else 'no'}")
        return 0
    from genai_mlflow.setup import Pipeline

    pipeline = Pipeline.build(settings)
    try:
        landed = pipeline.flush(args.timeout)
        status = pipeline.spool.status()
    finally:
        pipeline.shutdown(timeout_s=5)
    print(
        f"replayed to {settings.tracking_uri}: {pipeline.writer.landed} traces landed, "
        f"{status.pending_records} records left"
    )
    return 0 if landed else 1


def _add_collector_parser(commands: Any, after_command: argparse.ArgumentParser) -> None:
    collector = commands.add_parser(
        "collector",
        parents=[after_command],
        help="OTLP/HTTP receiver: GenAI spans from any service to MLflow",
    )
    collector.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    collector.add_argument("--port", type=int, help="port to listen on (default 4318)")
    collector.add_argument(
        "--token", help="bearer token POST /v1/traces requires (or GENAI_MLFLOW_COLLECTOR_TOKEN)"
    )
    collector.add_argument(
        "--max-body-bytes", type=int, help="request body limit, also once decompressed (16 MiB)"
    )
    collector.add_argument("--max-inflight", type=int, help="requests processed at once; more get 429 (4)")
    collector.add_argument("--max-rps", type=float, help="requests per second; more get 429 (0: no limit)")
    collector.add_argument("--grace", type=float, help="seconds to flush to MLflow on SIGTERM (25)")
    collector.add_argument("--spool-dir", help="default: GENAI_MLFLOW_SPOOL_DIR, else per tracking URI")


def _collector(args: argparse.Namespace) -> int:
    from genai_mlflow.collector import CollectorConfig, run_collector

    settings = Settings.resolve(args.tracking_uri, spool_dir=args.spool_dir)
    config = CollectorConfig.resolve(
        host=args.host,
        port=args.port,
        token=args.token,
        max_body_bytes=args.max_body_bytes,
        max_inflight=args.max_inflight,
        max_rps=args.max_rps,
        grace_s=args.grace,
    )
    return run_collector(settings, config)


def main(argv: Sequence[str] | None = None) -> int:
    uri_help = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite)"
    parser = argparse.ArgumentParser(prog="genai-mlflow", description=__doc__)
    parser.add_argument("--tracking-uri", help=uri_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the pipeline does")
    # Also accepted after the command (`genai-mlflow doctor --tracking-uri ...`); SUPPRESS keeps
    # a value given before the command when none is given after it.
    after_command = argparse.ArgumentParser(add_help=False)
    after_command.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=uri_help)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        parents=[after_command],
        help="personas calling a local OpenAI-compatible server, landing in MLflow",
    )
    commands.add_parser(
        "doctor",
        parents=[after_command],
        help="check the configuration and connectivity, and say what to fix",
    )
    spool = commands.add_parser("spool", parents=[after_command], help="inspect or replay the on-disk spool")
    spool.add_argument("action", choices=("status", "replay"))
    spool.add_argument("--spool-dir", help="default: GENAI_MLFLOW_SPOOL_DIR, else per tracking URI")
    spool.add_argument("--timeout", type=float, default=300.0, help="replay: seconds to wait for MLflow")
    _add_collector_parser(commands, after_command)
    compare.add_parser(commands, after_command)
    stack.add_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "demo":
            from genai_mlflow.demo import run_demo

            return run_demo(args.tracking_uri)
        if args.command == "doctor":
            from genai_mlflow.doctor import run_doctor

            return run_doctor(sys.stdout, args.tracking_uri)
        if args.command == "collector":
            return _collector(args)
        if args.command == "stack":
            return stack.run(args)
        if args.command == "compare":
            return compare.run(args, Settings.resolve(args.tracking_uri).tracking_uri)
        return _spool(args)
    except ConfigError as exc:
        print(f"genai-mlflow: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
