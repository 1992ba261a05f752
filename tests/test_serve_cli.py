"""`smallcap serve` as a user starts it: defaults, offline, a caption equal to the Python API's, SIGTERM
draining an in-flight request before a clean exit, and bad options refused before anything loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'smallcap[serve]'")
import httpx  # noqa: E402

from conftest import REPO, run_cli  # noqa: E402
from serving_helpers import free_port, smallest_coco_images, wait_ready  # noqa: E402
from test_packaging import assert_one_line_error, run_without_extras  # noqa: E402


def api_caption(image) -> dict:
    """What the Python API gives for `image` with the mini model and mini-source, threads pinned as the server's."""
    import torch

    from smallcap.captioner import Captioner

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Captioner.from_pretrained("mini", datastores=["mini-source"])([image])[0].to_dict()
    finally:
        torch.set_num_threads(before)


def test_serve_with_defaults_answers_like_the_api_and_drains_on_sigterm():
    image = smallest_coco_images(1)[0]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # A long batching window keeps the last request in flight while SIGTERM arrives.
    server = subprocess.Popen([sys.executable, "-m", "smallcap", "serve", "--port", str(port),
                               "--max-wait-ms", "1500"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        expected = api_caption(image)  # while the server loads
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 180
            while True:
                try:
                    wait_ready(client, timeout=180)
                    break
                except httpx.TransportError:  # not listening yet
                    assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                    time.sleep(0.3)
            stores = client.get("/v1/datastores").json()["datastores"]
            assert [(s["name"], s["default"]) for s in stores] == [("mini-source", True), ("mini-target", False)]
            files = {"files": (image.name, image.read_bytes(), "image/jpeg")}
            answer = client.post("/v1/captions", files=files).json()["results"][0]
            assert answer["caption"] == expected["caption"]
            assert [r["caption"] for r in answer["retrieved"]] == expected["retrieved"]
            assert client.get("/").status_code == 200 and "smallcap" in client.get("/").text

            in_flight: dict = {}
            request = threading.Thread(target=lambda: in_flight.update(
                response=client.post("/v1/captions", files=files)))
            request.start()
            waiting = time.monotonic() + 20
            while "smallcap_queue_depth 1.0" not in httpx.get(f"http://127.0.0.1:{port}/metrics").text:
                assert time.monotonic() < waiting, "the request never reached the queue"
                time.sleep(0.05)
            # The request now waits in the batching window.
            server.send_signal(signal.SIGTERM)
            request.join(timeout=60)
        assert in_flight["response"].status_code == 200
        assert in_flight["response"].json()["results"][0]["caption"] == expected["caption"]
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


def test_serve_refuses_bad_options_before_loading(tmp_path):
    missing = run_cli("serve", "--datastore", str(tmp_path / "nowhere"), "--port", str(free_port()), check=False)
    assert missing.returncode == 2
    assert "nowhere" in missing.stderr and "not a datastore directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    batch = run_cli("serve", "--max-batch", "0", check=False)
    assert batch.returncode == 2 and "--max-batch must be at least 1" in batch.stderr


def test_serve_without_the_serve_extra_is_one_message():
    result = run_without_extras("serve", "--port", str(free_port()), blocked=("fastapi", "uvicorn"))
    assert_one_line_error(result, "serve")
    assert "Serving over HTTP" in result.stderr
