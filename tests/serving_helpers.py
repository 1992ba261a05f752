"""Helpers for the serving tests: a real uvicorn on a free loopback port in a thread, and test images."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from conftest import COCO_MINI, run_cli

COCO_VAL = COCO_MINI / "val2017"


def smallest_coco_images(count: int) -> list[Path]:
    """The `count` smallest real COCO validation images (small request bodies, same images every run)."""
    return sorted(COCO_VAL.glob("*.jpg"), key=lambda p: (p.stat().st_size, p.name))[:count]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(app, timeout: float = 120.0):
    """Run `app` on uvicorn at 127.0.0.1:<free port> in a thread; yields the base URL; always shuts it down."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "server thread did not stop"


def wait_ready(client, timeout: float = 180.0) -> None:
    """Poll /health until 200."""
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("server not ready")
        time.sleep(0.2)


def cli_captions(paths, *options: str) -> dict[str, dict]:
    """`smallcap caption --model mini OPTIONS PATHS` as {file name: JSON line}, run the way a user runs it."""
    result = run_cli("caption", "--model", "mini", *options, *paths, env={"OMP_NUM_THREADS": "1"})
    return {Path(row["image"]).name: row for row in map(json.loads, result.stdout.splitlines())}
