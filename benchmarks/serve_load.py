"""Serving under load: `smallcap serve` with concurrent clients versus the offline `Captioner`, in one run.

The server is a real `smallcap serve` subprocess on 127.0.0.1 (retrieval from the bundled `mini-source`
datastore, beam 3, 25 new tokens); each of C concurrent clients sends R single-image requests with real COCO
images from ../shared/data/coco-mini. In the same run, on the same model files, images and thread count, the
offline `Captioner` captions the same images one at a time (the latency a direct call has) and in batches of
C (the throughput batching can reach). Reported: served images/s, p50/p95/p99 latency, errors, and the ratios
served / offline.

    python benchmarks/serve_load.py [--models mini real-size] [--clients 1 4 16] [--requests 4] [--threads 1]

`real-size` is the real architecture (CLIP ViT-B/32 vision + GPT-2 small, r=4) with random weights, built as
benchmarks/caption_throughput.py builds it and saved to a temporary checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared"))
DATASTORE = "mini-source"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def real_size_checkpoint(directory: Path) -> str:
    """Save the random-weight real-size SmallCap with a GPT-2 tokenizer and CLIP image processor."""
    from transformers import CLIPImageProcessor

    sys.path.insert(0, str(REPO / "benchmarks"))
    from caption_throughput import build_model

    from smallcap.prompt import load_tokenizer

    build_model("sdpa").save_pretrained(directory)
    load_tokenizer(str(SHARED / "data/tokenizers/gpt2")).save_pretrained(directory)
    CLIPImageProcessor().save_pretrained(directory)
    return str(directory)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "smallcap", "serve", "--model", model, "--datastore", DATASTORE,
                               "--port", str(port), "--max-batch", str(max_batch), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not become ready")
        time.sleep(0.5)


def load(url: str, paths: list[Path], clients: int, requests_each: int) -> dict:
    """C clients, each sending R single-image requests back to back; latencies and throughput."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as session:
            for r in range(requests_each):
                path = paths[(index * requests_each + r) % len(paths)]
                start = time.perf_counter()
                response = session.post("/v1/captions", files={"files": (path.name, path.read_bytes(), "image/jpeg")})
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200 or response.json()["results"][0]["error"]:
                        errors.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"clients": clients, "requests": clients * requests_each, "seconds": round(seconds, 2),
            "images_per_second": round(clients * requests_each / seconds, 3),
            "p50_ms": round(percentile(latencies, 50) * 1e3, 1), "p95_ms": round(percentile(latencies, 95) * 1e3, 1),
            "p99_ms": round(percentile(latencies, 99) * 1e3, 1), "errors": len(errors), "error_examples": errors[:3]}


def offline(model: str, paths: list[Path], batch_sizes: list[int], single_calls: int) -> dict:
    """The offline Captioner on the same files: single-image call latency and batched throughput."""
    from smallcap.captioner import Captioner

    captioner = Captioner.from_pretrained(model, datastores=[DATASTORE])
    captioner(paths[:2], batch_size=2)  # warm-up
    singles = []
    for path in (paths * single_calls)[:single_calls]:
        start = time.perf_counter()
        captioner([path], batch_size=1)
        singles.append(time.perf_counter() - start)
    throughput = {}
    for batch_size in batch_sizes:
        images = (paths * ((batch_size * 2) // len(paths) + 1))[:max(batch_size * 2, 4)]
        start = time.perf_counter()
        captioner(images, batch_size=batch_size)
        throughput[batch_size] = round(len(images) / (time.perf_counter() - start), 3)
    return {"single_call_p50_ms": round(statistics.median(singles) * 1e3, 1), "single_calls": len(singles),
            "images_per_second_by_batch": throughput}


def run_model(name: str, model: str, args) -> dict:
    paths = sorted((SHARED / "data/coco-mini/val2017").glob("*.jpg"))[:args.images]
    server, url = start_server(model, args.threads, max(args.clients))
    try:
        httpx.post(url + "/v1/captions", files={"files": (paths[0].name, paths[0].read_bytes(), "image/jpeg")},
                   timeout=600)  # warm-up
        served = []
        for clients in args.clients:
            served.append(load(url, paths, clients, args.requests))
            print(name, json.dumps(served[-1]), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    direct = offline(model, paths, args.clients, args.single_calls)
    print(name, "offline", json.dumps(direct), flush=True)
    for row in served:
        row["offline_batch_images_per_second"] = direct["images_per_second_by_batch"][row["clients"]]
        row["throughput_ratio_vs_offline_batch"] = round(
            row["images_per_second"] / row["offline_batch_images_per_second"], 3)
        row["p50_ratio_vs_single_call"] = round(row["p50_ms"] / direct["single_call_p50_ms"], 3)
    return {"model": name, "served": served, "offline": direct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mini"], choices=["mini", "real-size"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="single-image requests per client")
    parser.add_argument("--images", type=int, default=16, help="distinct COCO images cycled through")
    parser.add_argument("--single-calls", type=int, default=8, help="direct single-image calls timed offline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and offline alike")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/serve_load.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(REPO / "src"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = "mini" if name == "mini" else real_size_checkpoint(Path(tmp) / "real-size")
            rows.append(run_model(name, model, args))
    result = {
        "benchmark": "serve_load",
        "setup": {"datastore": DATASTORE, "num_beams": 3, "max_new_tokens": 25, "requests_per_client":
                  args.requests, "images": args.images, "threads": args.threads, "server": "smallcap serve, "
                  "--max-wait-ms 10, --max-batch = largest client count", "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                  "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
