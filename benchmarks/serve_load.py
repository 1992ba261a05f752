"""Serving under load: `smallcap serve` with concurrent clients versus the offline `Captioner`, in one run.

The server is a real `smallcap serve` subprocess on 127.0.0.1 (retrieval from the bundled `mini-source`
datastore, beam 3, 25 new tokens); each of C concurrent clients sends R single-image requests with real COCO
images from ../shared/data/coco-mini. Right after each load test, in the same process, on the same model files,
images and thread count, the offline `Captioner` captions the same number of images in batches of C (the
throughput batching can reach, batches capped at the server's --max-batch; for C = 1, direct single-image
calls and their latency). Reported: served images/s, p50/p95/p99 latency, errors, and the ratios
served / offline.

    python benchmarks/serve_load.py [--models mini real-size] [--clients 1 4 16 64] [--requests 2] [--threads 1]

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


def offline_single(captioner, paths: list[Path], calls: int) -> dict:
    """Direct single-image `Captioner` calls: their p50 latency and images/s."""
    singles = []
    for path in (paths * calls)[:calls]:
        start = time.perf_counter()
        captioner([path], batch_size=1)
        singles.append(time.perf_counter() - start)
    return {"p50_ms": round(statistics.median(singles) * 1e3, 1), "images_per_second": round(calls / sum(singles), 3)}


def offline_batch(captioner, paths: list[Path], batch_size: int, images: int) -> float:
    """Offline throughput (images/s) captioning `images` files in batches of `batch_size`."""
    files = (paths * (images // len(paths) + 1))[:images]
    start = time.perf_counter()
    captioner(files, batch_size=batch_size)
    return round(len(files) / (time.perf_counter() - start), 3)


def run_model(name: str, model: str, args) -> dict:
    """For each client count C: the served load test, then right after it the offline Captioner on the same
    number of images in batches of C (and direct single-image calls), so both see the same machine load."""
    from smallcap.captioner import Captioner

    paths = sorted((SHARED / "data/coco-mini/val2017").glob("*.jpg"))[:args.images]
    load_before = [round(x, 2) for x in os.getloadavg()]
    captioner = Captioner.from_pretrained(model, datastores=[DATASTORE])
    captioner(paths[:1], batch_size=1)  # warm-up
    server, url = start_server(model, args.threads, args.max_batch)
    rows = []
    try:
        httpx.post(url + "/v1/captions", files={"files": (paths[0].name, paths[0].read_bytes(), "image/jpeg")},
                   timeout=600)  # warm-up
        for clients in args.clients:
            row = load(url, paths, clients, args.requests)
            if clients == 1:
                single = offline_single(captioner, paths, max(args.single_calls, row["requests"]))
                row["offline_images_per_second"] = single["images_per_second"]
                row["offline_single_call_p50_ms"] = single["p50_ms"]
                row["p50_ratio_vs_single_call"] = round(row["p50_ms"] / single["p50_ms"], 3)
            else:
                row["offline_batch_size"] = min(clients, args.max_batch)
                row["offline_images_per_second"] = offline_batch(captioner, paths, row["offline_batch_size"],
                                                                 row["requests"])
            row["throughput_ratio_vs_offline"] = round(row["images_per_second"] / row["offline_images_per_second"], 3)
            rows.append(row)
            print(name, json.dumps(row), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    return {"model": name, "rows": rows, "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mini"], choices=["mini", "real-size"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="single-image requests per client")
    parser.add_argument("--images", type=int, default=16, help="distinct COCO images cycled through")
    parser.add_argument("--single-calls", type=int, default=4, help="direct single-image calls timed offline")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (offline batch cap)")
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
            write(args, rows)


def write(args, rows: list[dict]) -> None:
    """Write the results so far (each model's block is complete in itself)."""
    import torch

    result = {
        "benchmark": "serve_load",
        "setup": {"datastore": DATASTORE, "num_beams": 3, "max_new_tokens": 25, "requests_per_client":
                  args.requests, "images": args.images, "threads": args.threads, "server": "smallcap serve, "
                  f"--max-wait-ms 10, --max-batch {args.max_batch}", "torch": torch.__version__,
                  "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
