"""A two-node Ray cluster on this one machine (`ray start --head` + `ray start --address`): captioning actors on
both nodes, and a whole worker node killed during a job.

On Linux, Ray 2.x rewrites `--node-ip-address 127.0.0.1` to the machine's routable address (its
`resolve_ip_for_localhost`); the only switch that keeps loopback (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) also
forbids worker nodes. So both nodes register under this machine's own address (nothing leaves the machine).
Token authentication is turned off (`RAY_AUTH_MODE=disabled`) for the test cluster, which only this test joins.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the optional extra smallcap[ray]")

from test_ray import OPTIONS, VAL, caption_worker_processes, single_process_captions  # noqa: E402

from smallcap.scale.predict import read_output_shard  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
# Every coco-mini image (val and train, 159): enough work that both nodes' actors are busy when one is killed.
IMAGES = sorted([*VAL.glob("*.jpg"), *(VAL.parent / "train2017").glob("*.jpg")], key=lambda path: path.name)


def _processes_mentioning(text: str) -> dict[int, int]:
    """pid -> parent pid of the processes whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().decode(errors="replace")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if text in command:
                found[int(entry.name)] = ppid
    return found


def _with_children(pids: set[int]) -> set[int]:
    """`pids` and all their descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = set(pids), True
    while grew:
        added = {pid for pid, ppid in parents.items() if ppid in tree and pid not in tree}
        tree |= added
        grew = bool(added)
    return tree


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def two_nodes():
    """Head (3 logical CPUs) and a worker node (1 CPU, resource `node2_<pid>`) from `ray start`; the test's
    driver is connected. Every process of both nodes is killed by pid at the end (never `ray stop`, which
    would stop other users' Ray on this machine)."""
    temp = Path(tempfile.mkdtemp(prefix="scr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    marker = f"node2_{os.getpid()}"
    started: set[int] = set()
    try:
        subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", "3", "--temp-dir", str(temp), "--include-dashboard", "false"],
                       env=env, check=True, capture_output=True, timeout=180)
        started |= set(_processes_mentioning(str(temp)))
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--resources", json.dumps({marker: 1})],
                       env=env, check=True, capture_output=True, timeout=180)
        node2 = set(_processes_mentioning(str(temp))) - started
        raylet = next(pid for pid, _ in _processes_mentioning(marker).items()
                      if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0])
        started |= node2
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        alive, until = 0, time.monotonic() + 60  # `ray start` may return before the GCS lists the new node
        while alive != 2 and time.monotonic() < until:
            alive = len([node for node in ray.nodes() if node["Alive"]])
            time.sleep(0.5)
        assert alive == 2, f"{alive} Ray nodes alive, expected the head and the worker node"
        yield {"node2": node2 | {raylet}, "raylet": raylet, "address": f"127.0.0.1:{port}"}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _kill(_with_children(started | set(_processes_mentioning(str(temp)))))
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth
        shutil.rmtree(temp, ignore_errors=True)


def _captioning_on(raylet: int) -> bool:
    """Whether a captioning actor under this raylet is running a batch (its process title names the method)."""
    return any(ppid == raylet and b".submit" in command for _, ppid, command in caption_worker_processes())


@pytest.mark.slow
def test_worker_node_killed_mid_job(two_nodes, tmp_path):
    """`smallcap predict --engine ray --address HOST:PORT --num-workers 2`, run as a user runs it: one captioning
    actor per node; once shards are written and the worker node's actor is captioning, that node (its raylet and
    every process under it) is SIGKILLed. The job finishes on the head node with the captions of the
    uninterrupted single-process run, every image once."""
    expected = single_process_captions(IMAGES)
    folder = tmp_path / "images"
    folder.mkdir()
    for image in IMAGES:
        (folder / image.name).symlink_to(image)
    out = tmp_path / "preds.json"
    shard_dir = tmp_path / "preds.json.shards" / "shards"
    shards = (len(IMAGES) + 5) // 6
    command = [sys.executable, "-m", "smallcap", "predict", str(folder), "--model", OPTIONS["model"],
               "--datastore", *OPTIONS["datastores"], "--engine", "ray", "--address", two_nodes["address"],
               "--num-workers", "2", "--shard-size", "6", "--batch-size", "3", "--out", str(out)]
    # Ray Data starts its actor pool asynchronously by default, so decode tasks (half a CPU each) could take the
    # worker node's one CPU first and leave both captioning actors on the head: no captioning actor to lose with
    # the node. Waiting for the pool before any task runs lets SPREAD place one actor per node, every run.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "RAY_AUTH_MODE": "disabled",
           "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed_at, deadline, seen = None, time.monotonic() + 540, set()
        while job.poll() is None and killed_at is None and time.monotonic() < deadline:
            done = len(list(shard_dir.glob("*.jsonl"))) if shard_dir.is_dir() else 0
            seen |= {(pid, ppid) for pid, ppid, _ in caption_worker_processes()}
            if done >= 1 and _captioning_on(two_nodes["raylet"]):
                killed_at = done
                _kill(_with_children(two_nodes["node2"]))
            time.sleep(0.1)
        _, stderr = job.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert killed_at is not None and killed_at < shards, \
        f"the worker node's actor was not captioning mid-job (shards done when killed: {killed_at}; captioning " \
        f"actors seen as (pid, parent): {sorted(seen)}, worker node's raylet {two_nodes['raylet']})"
    alive, until = 2, time.monotonic() + 90  # the head notices a dead node by missed health checks
    while alive != 1 and time.monotonic() < until:
        alive = len([node for node in ray.nodes() if node["Alive"]])
        time.sleep(1)
    assert alive == 1, "the killed worker node is still reported alive"
    rows = json.loads(out.read_text())
    assert [row["image_id"] for row in rows] == [int(p.stem) for p in IMAGES]
    assert [row["caption"] for row in rows] == [expected[p.name] for p in IMAGES]
    written = [row["image_id"] for path in sorted(shard_dir.iterdir()) for row in read_output_shard(path)]
    assert sorted(written) == sorted(int(p.stem) for p in IMAGES)
