"""The ``genai-mlflow`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genai-mlflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run a few personas against a local OpenAI-compatible server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from genai_mlflow.demo import run_demo

        return run_demo()
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
