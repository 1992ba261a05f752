"""Captioning throughput: local `predict` versus `predict --engine ray` with 1 and 2 captioning workers.

The same real COCO images (../shared/data/coco-mini, val2017 + train2017) through the bundled `mini` model and
the real-size architecture (CLIP ViT-B/32 vision + GPT-2 small, r=4, random weights, saved to a temporary
checkpoint as benchmarks/serve_load.py saves it), both with retrieval from `mini-source`, all in one run on one
local Ray cluster (`ray.init(num_cpus=...)`). Per model and variant:

- wall time (Ray: from job submission, so actor start-up counts; local: model load included);
- steady-state throughput: local, images / captioning time after the model is loaded; Ray, the images of the
  shards finished after the first `workers` shards / the time from the `workers`-th to the last shard file
  (so each worker's first shard, which holds its start-up, is left out);
- start-up: wall time minus images / steady throughput (what a job pays before it runs at full speed);
- whether the merged captions equal the local ones.

These are the per-image costs and the fixed cost to project from (see the README's "Captioning at scale").

    python benchmarks/ray_scaling.py [--models mini real-size] [--workers 1 2] [--out ...ray_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
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
DATASTORE = "mini-source"
# images, batch size, shard size per model: the real-size model captions ~0.1 image/s on one loaded core here
DEFAULTS = {"mini": (159, 16, 16), "real-size": (8, 2, 2)}


def run_local(options: dict, folder: Path, out: Path, batch_size: int) -> tuple[dict, list]:
    """Single-process `predict` on one torch thread: timings and the rows it wrote."""
    torch.set_num_threads(1)  # one core per captioner, as each Ray actor gets
    started = time.perf_counter()
    captioner = Captioner.from_pretrained(**options)
    loaded = time.perf_counter()
    pairs = [(int(p.stem), p) for p in sorted(folder.iterdir())]
    predict(captioner, pairs, out, batch_size=batch_size, progress=False)
    finished = time.perf_counter()
    steady = len(pairs) / (finished - loaded)
    return ({"wall_s": round(finished - started, 2), "load_s": round(loaded - started, 2),
             "steady_images_per_s": round(steady, 3), "startup_s": round(finished - started - len(pairs) / steady, 2)},
            json.loads(out.read_text()))


def run_ray(options: dict, folder: Path, out: Path, workers: int, batch_size: int, shard_size: int,
            local_rows: list) -> dict:
    """`predict_on_ray` with `workers` captioning actors on the connected cluster: timings from the shard files."""
    shards = plan_shards([str(folder)], shard_size=shard_size)
    if len(shards) <= workers:
        raise SystemExit(f"{len(shards)} shards for {workers} workers: give more images or a smaller shard size")
    started = time.time()
    predict_on_ray(shards, out, options, num_workers=workers, batch_size=batch_size, progress=False)
    wall = time.time() - started
    files = sorted((out.parent / f"{out.name}.shards" / "shards").iterdir(), key=lambda p: p.stat().st_mtime)
    times = [path.stat().st_mtime for path in files]
    after = sum(1 for path in files[workers:] for line in path.read_text().splitlines() if line)
    steady = after / max(times[-1] - times[workers - 1], 1e-9)
    images = sum(len(shard.items) for shard in shards)
    return {"wall_s": round(wall, 2), "first_shard_s": round(times[0] - started, 2),
            "steady_images_per_s": round(steady, 3), "startup_s": round(wall - images / steady, 2),
            "shards": len(shards), "captions_equal_local": json.loads(out.read_text()) == local_rows}


def real_size_model(directory: Path) -> str:
    """The real-size random-weight checkpoint, saved by benchmarks/serve_load.py's helper."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve_load import real_size_checkpoint

    return real_size_checkpoint(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mini", "real-size"], choices=list(DEFAULTS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray's logical CPUs (default: workers + 1)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray_scaling.json")
    args = parser.parse_args()

    coco = SHARED / "data" / "coco-mini"
    every_image = sorted([*(coco / "val2017").glob("*.jpg"), *(coco / "train2017").glob("*.jpg")])
    work = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    load_before = os.getloadavg()
    results: dict = {"datastore": DATASTORE, "cpus": os.cpu_count(), "platform": platform.platform(),
                     "torch": torch.__version__, "ray": ray.__version__, "torch_threads_per_captioner": 1,
                     "models": {}}
    ray.init(num_cpus=args.num_cpus or max(args.workers) + 1, include_dashboard=False, log_to_driver=False)
    try:
        for name in args.models:
            count, batch_size, shard_size = DEFAULTS[name]
            folder = work / name / "images"
            folder.mkdir(parents=True)
            for image in every_image[:count]:
                (folder / image.name).symlink_to(image)
            model = "mini" if name == "mini" else real_size_model(work / name / "checkpoint")
            options = {"model": model, "datastores": [DATASTORE]}
            entry = {"images": count, "batch_size": batch_size, "shard_size": shard_size, "variants": {}}
            results["models"][name] = entry
            entry["variants"]["local"], local_rows = run_local(options, folder, work / name / "local.json",
                                                               batch_size)
            print(name, "local", entry["variants"]["local"], flush=True)
            for workers in args.workers:
                variant = run_ray(options, folder, work / name / f"ray-{workers}.json", workers, batch_size,
                                  shard_size, local_rows)
                variant["steady_vs_local"] = round(variant["steady_images_per_s"]
                                                   / entry["variants"]["local"]["steady_images_per_s"], 3)
                variant["wall_vs_local"] = round(entry["variants"]["local"]["wall_s"] / variant["wall_s"], 3)
                entry["variants"][f"ray_{workers}_workers"] = variant
                print(name, f"ray {workers}", variant, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_before"] = [round(x, 2) for x in load_before]
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
