"""Captioning throughput: local `predict` versus `predict --engine ray` with 1 and 2 captioning workers.

The same real COCO images (../shared/data/coco-mini, val2017 + train2017) and the bundled `mini` model with
retrieval from `mini-source`, all in one run on one local Ray cluster (`ray.init(num_cpus=...)`). For each
variant: wall time (Ray: from job submission, so actor start-up counts) and steady-state throughput (Ray:
images in the shards after the first one / time between the first and the last shard file being written), and
whether the merged captions equal the local ones. Results are per-image costs you can project from.

    python benchmarks/ray_scaling.py [--images 159] [--workers 1 2] [--out benchmarks/results/ray_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch

from smallcap.captioner import Captioner
from smallcap.prediction import predict
from smallcap.scale.predict import predict_on_ray
from smallcap.scale.sources import plan_shards

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared"))
OPTIONS = {"model": "mini", "datastores": ["mini-source"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=159)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray's logical CPUs (default: workers + 1)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray_scaling.json")
    args = parser.parse_args()

    coco = SHARED / "data" / "coco-mini"
    images = sorted([*(coco / "val2017").glob("*.jpg"), *(coco / "train2017").glob("*.jpg")])[:args.images]
    work = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    folder = work / "images"
    folder.mkdir()
    for image in images:
        (folder / image.name).symlink_to(image)
    load_before = os.getloadavg()
    results: dict = {"images": len(images), "model": "mini (bundled) + mini-source datastore",
                     "batch_size": args.batch_size, "shard_size": args.shard_size, "cpus": os.cpu_count(),
                     "platform": platform.platform(), "torch_threads_local": 1, "variants": {}}

    torch.set_num_threads(1)  # one core per captioner, as each Ray actor gets
    started = time.perf_counter()
    captioner = Captioner.from_pretrained(**OPTIONS)
    loaded = time.perf_counter()
    pairs = [(int(p.stem), p) for p in sorted(folder.iterdir())]
    predict(captioner, pairs, work / "local.json", batch_size=args.batch_size, progress=False)
    finished = time.perf_counter()
    local_rows = json.loads((work / "local.json").read_text())
    results["variants"]["local"] = {"wall_s": round(finished - started, 2), "load_s": round(loaded - started, 2),
                                    "steady_images_per_s": round(len(images) / (finished - loaded), 2)}
    print("local", results["variants"]["local"], flush=True)

    ray.init(num_cpus=args.num_cpus or max(args.workers) + 1, include_dashboard=False, log_to_driver=False)
    try:
        shards = plan_shards([str(folder)], shard_size=args.shard_size)
        for workers in args.workers:
            out = work / f"ray-{workers}.json"
            started = time.perf_counter()
            predict_on_ray(shards, out, OPTIONS, num_workers=workers, batch_size=args.batch_size, progress=False)
            wall = time.perf_counter() - started
            files = sorted((work / f"ray-{workers}.json.shards" / "shards").iterdir(), key=lambda p: p.stat().st_mtime)
            first, last = files[0].stat().st_mtime, files[-1].stat().st_mtime
            after_first = sum(1 for path in files[1:] for line in path.read_text().splitlines() if line)
            same = json.loads(out.read_text()) == local_rows
            results["variants"][f"ray_{workers}_workers"] = {
                "wall_s": round(wall, 2), "steady_images_per_s": round(after_first / max(last - first, 1e-9), 2),
                "captions_equal_local": same}
            print(f"ray {workers}", results["variants"][f"ray_{workers}_workers"], flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    local = results["variants"]["local"]["steady_images_per_s"]
    for name, variant in results["variants"].items():
        if name != "local":
            variant["steady_vs_local"] = round(variant["steady_images_per_s"] / local, 3)
    results["load_average_before"] = [round(x, 2) for x in load_before]
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
