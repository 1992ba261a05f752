"""The `smallcap` command line: one subcommand module per pipeline verb, each a thin layer over the API.

Each module in `COMMANDS` exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from smallcap.errors import SmallCapError

COMMANDS = [
    "smallcap.cli.caption",
    "smallcap.cli.predict",
    "smallcap.cli.evaluate",
    "smallcap.cli.datastore",
    "smallcap.cli.features",
    "smallcap.cli.train",
    "smallcap.cli.demo",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="smallcap", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SmallCapError as error:
        print(f"smallcap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
