"""A warm start for the tests' `smallcap` command runs: a process that imports torch, transformers and smallcap
once, then forks one child per command.

Each child is a real process running `smallcap.cli.main` with the command's arguments, environment and working
directory, its stdout and stderr written to files and its exit status that of the command, as with
`python -m smallcap ...`; it only skips the interpreter start and the imports (4-10 s of CPU each, over a hundred
runs per test session). `conftest.run_cli` uses it unless a run changes the environment that those imports read,
or `SMALLCAP_TEST_FRESH_INTERPRETER=1` asks for a fresh interpreter every time.

Protocol on stdin/stdout, one JSON object per line: a request {"args", "env", "cwd", "stdout", "stderr"} gets
{"pid": PID} once the child runs, then {"returncode": N}.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def _preload() -> None:
    # What nearly every command imports (an optional extra that is missing is simply not preloaded). Nothing
    # here may start a thread: the process forks afterwards.
    for module in ("torch", "transformers", "smallcap.cli", "smallcap.captioner", "smallcap.prediction",
                   "smallcap.retrieval.datastore", "smallcap.training"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def _child(request: dict) -> None:
    """Become the command; ends the (forked) process with its exit status."""
    os.environ.clear()
    os.environ.update(request["env"])
    if request["cwd"]:
        os.chdir(request["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = ["smallcap", *request["args"]]
    from smallcap.cli import main

    try:
        code = main(request["args"])
    except SystemExit as stop:  # argparse's usage errors, --help, --version
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int) and stop.code is not None:
            print(stop.code, file=sys.stderr)
    except BaseException:  # what the interpreter would do with an uncaught exception
        traceback.print_exc()
        code = 1
    raise SystemExit(code)  # unwinds out of serve(): the interpreter's own exit (atexit handlers, flushing)


def serve() -> None:
    """Answer requests until stdin closes."""
    _preload()
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
