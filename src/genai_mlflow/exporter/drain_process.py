"""The writer in a process of its own (``GENAI_MLFLOW_WRITER=process``): the app's interpreter only
appends to the spool; this process drains it to MLflow. When the app shuts its pipeline down
(SIGTERM) or exits, it drains what is left, within a bounded wait, and exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from genai_mlflow.config import Settings

logger = logging.getLogger("genai_mlflow.exporter")

PARENT_POLL_S = 0.5
DRAIN_AT_EXIT_S = 60.0


def spawn(settings: Settings) -> subprocess.Popen[bytes]:
    """Start a drain process for ``settings``; it watches this process and outlives it briefly."""
    # Every setting as this process resolved it (arguments and environment), so that the writer
    # process prices, tags and batches exactly as this one would have.
    resolved = {**dataclasses.asdict(settings), "spool_dir": str(settings.spool_dir), "writer": "thread"}
    command = [
        sys.executable,
        "-m",
        "genai_mlflow.exporter.drain_process",
        "--parent",
        str(os.getpid()),
        "--settings",
        json.dumps(resolved),
    ]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _parent_alive(pid: int) -> bool:
    return os.getppid() == pid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genai_mlflow.exporter.drain_process")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--settings", required=True, help="the app's resolved Settings, as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s genai-mlflow writer: %(message)s")
    from genai_mlflow.setup import Pipeline

    resolved = json.loads(args.settings)
    settings = Settings(**{**resolved, "spool_dir": Path(resolved["spool_dir"])})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    pipeline = Pipeline.build(settings)
    try:
        while _parent_alive(args.parent) and not stop.wait(PARENT_POLL_S):
            pass
        pipeline.flush(DRAIN_AT_EXIT_S)
    finally:
        pipeline.shutdown(timeout_s=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
