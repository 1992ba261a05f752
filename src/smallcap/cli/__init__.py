"""The `smallcap` command line: one subcommand module per pipeline verb, each a thin layer over the API.

Each module in `COMMANDS` exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning an exit code; it may set `validate`, a callable that checks
the options together (raising SmallCapError) before `func` runs. Subcommand modules import the parts of the
package that load torch, transformers, faiss or an optional extra inside `run`, so that `smallcap CMD --help` and
bad arguments answer at once; everything light is imported at the top.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from smallcap import __version__
from smallcap.errors import SmallCapError

COMMANDS = [
    "smallcap.cli.caption",
    "smallcap.cli.predict",
    "smallcap.cli.evaluate",
    "smallcap.cli.datastore",
    "smallcap.cli.features",
    "smallcap.cli.train",
    "smallcap.cli.demo",
    "smallcap.cli.serve",
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser: with `command`, only that subcommand's module is imported (fast start-up);
    for `--version` none; otherwise every registered subcommand (for the overview help)."""
    parser = argparse.ArgumentParser(prog="smallcap", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"smallcap {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [n for n in COMMANDS if n.rsplit(".", 1)[-1] == command]
    if not names and command != "--version":  # the version needs no subcommand (nor torch)
        names = COMMANDS
    for name in names:
        importlib.import_module(name).register(subparsers)
    return parser


def _quiet_library_output() -> None:
    # transformers' own weight-loading bars and backend notices are noise on a user's terminal; our commands
    # show their own progress and report problems themselves.
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv[0] if argv else None).parse_args(argv)
    except SmallCapError as error:  # a subcommand module could not be imported (e.g. a missing extra)
        print(f"smallcap: error: {error}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "validate", None) is not None:  # checks across options, before any work
            args.validate(args)
        _quiet_library_output()
        return int(args.func(args) or 0)
    except SmallCapError as error:
        print(f"smallcap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
