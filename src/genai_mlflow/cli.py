"""The ``genai-mlflow`` command: ``demo``, ``doctor`` and ``spool status|replay``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genai-mlflow", description=__doc__)
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the pipeline does")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="personas calling a local OpenAI-compatible server, landing in MLflow")
    commands.add_parser("doctor", help="check the configuration and connectivity, and say what to fix")
    spool = commands.add_parser("spool", help="inspect or replay the on-disk spool")
    spool.add_argument("action", choices=("status", "replay"))
    spool.add_argument("--spool-dir", help="default: GENAI_MLFLOW_SPOOL_DIR, else per tracking URI")
    spool.add_argument("--timeout", type=float, default=300.0, help="replay: seconds to wait for MLflow")
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
        return _spool(args)
    except ConfigError as exc:
        print(f"genai-mlflow: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
