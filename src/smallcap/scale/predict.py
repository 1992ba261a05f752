"""`smallcap predict --engine ray`: caption input shards on a Ray cluster, one output file per shard, resumably.

Pipeline (Ray Data): the unfinished shards -> `expand` (list a shard's items; a tar is read here) -> `decode`
(CPU tasks: files and tar members to RGB pixels; videos to their tiled frames) -> `CaptionWorker` (an actor pool;
each actor loads the captioner and its datastores once, memory-mapped, and runs CLIP preprocessing, retrieval and
generation) -> the driver, which writes a shard's file (JSONL, or Parquet for a .parquet `--out`) atomically once
all its items are back.

Exactly once: every shard travels with a marker row carrying its item count, so the driver knows when a shard is
complete; rows are keyed by position, so an item redone after a worker died is stored once. Ray Data restarts a
dead captioning actor and reruns the blocks it held. A rerun skips shards whose file exists without errors.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smallcap.errors import SmallCapError, require_extra
from smallcap.images import DEFAULT_MAX_IMAGE_PIXELS
from smallcap.io import (atomic_write_json, atomic_write_parquet, atomic_write_predictions, atomic_write_text,
                         is_parquet, read_parquet_rows, require_parquet)
from smallcap.scale.sources import InputShard, Item, open_item, read_shard

PLAN_FILE = "plan.json"
SHARDS_DIR = "shards"


@dataclass
class RayPredictionReport:
    """What a Ray predict run did: shards captioned now / skipped as finished, images captioned, failures."""

    shards_done: int
    shards_resumed: int
    captioned: int
    failed: dict[str, str] = field(default_factory=dict)
    output: Path | None = None


def import_ray():
    """The `ray` module with Ray Data loaded, or MissingExtraError naming `pip install 'smallcap[ray]'`."""
    require_extra("ray.data", "ray", "Running on Ray (--engine ray)")
    return require_extra("ray", "ray", "Running on Ray (--engine ray)")


def connect(address: str | None = None) -> bool:
    """Connect to a Ray cluster (`address`: auto, HOST:PORT, ray://...) or start a local one when None; reuse
    a connection this process already has. Returns True when this call started it (and should shut it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError as error:
        raise SmallCapError(f"cannot connect to the Ray cluster at {address}: {error}") from None
    return True


def check_worker_pool(num_workers: int, gpus_per_worker: float) -> None:
    """SmallCapError unless an actor pool has at least one worker and a non-negative GPU share per worker."""
    if num_workers < 1:
        raise SmallCapError(f"--num-workers must be at least 1 (got {num_workers})")
    if gpus_per_worker < 0:
        raise SmallCapError(f"--gpus-per-worker must not be negative (got {gpus_per_worker})")


def quiet_ray_data() -> None:
    """Our own progress bar replaces Ray Data's per-operator bars and periodic progress log."""
    ray = import_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


SHARD_COLUMNS = ("image_id", "caption", "retrieved", "error")


def _shard_path(output_dir: Path, name: str, parquet: bool = False) -> Path:
    return output_dir / SHARDS_DIR / f"{name}.{'parquet' if parquet else 'jsonl'}"


def read_output_shard(path: Path) -> list[dict] | None:
    """The rows of a finished output shard (JSONL, or Parquet for a .parquet path); None when it is missing or
    holds errors (then it is redone)."""
    if not path.is_file():
        return None
    if is_parquet(path):
        rows = read_parquet_rows(path)
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return None if any("error" in row for row in rows) else rows


def _check_plan(output_dir: Path, plan: dict, overwrite: bool = False) -> None:
    """Refuse to mix outputs of other inputs or settings into `output_dir` (unless `overwrite`); record the plan
    for reruns."""
    path = output_dir / PLAN_FILE
    if path.exists() and not overwrite:
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = None
        if previous != plan:
            raise SmallCapError(f"{output_dir} holds outputs of a job with other inputs or settings ({path}); "
                                "pass another --output-dir, or --overwrite to redo every shard")
    atomic_write_json(path, plan)


def _expand(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard row -> a marker row with the item count, then one row per item (ids as JSON: int or str)."""
    shard = InputShard(row["shard"], tar=row["tar"] or None, items=tuple(map(tuple, json.loads(row["items"]))))
    rows = [{"shard": shard.name, "position": item.position, "image_id": json.dumps(item.image_id),
             "path": item.path or "", "data": item.data or b"", "name": item.name} for item in read_shard(shard)]
    return [{"shard": shard.name, "position": -1, "image_id": json.dumps(len(rows)), "path": "", "data": b"",
             "name": ""}, *rows]


def _decode(batch: dict[str, np.ndarray], video_options=None,
            max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Files and tar members to raw RGB pixels (`pixels` bytes + `height`, `width`), or an `error`."""
    pixels, heights, widths, errors = [], [], [], []
    for position, path, data, name in zip(batch["position"], batch["path"], batch["data"], batch["name"]):
        array, error = np.zeros((0, 0, 3), np.uint8), ""
        if position >= 0:
            try:
                array = np.asarray(open_item(Item("", int(position), path=str(path) or None, data=bytes(data),
                                                  name=str(name)), video_options, max_pixels))
            except SmallCapError as failure:
                error = str(failure)
        pixels.append(array.tobytes())
        heights.append(array.shape[0])
        widths.append(array.shape[1])
        errors.append(error)
    return {"shard": batch["shard"], "position": batch["position"], "image_id": batch["image_id"],
            "pixels": np.array(pixels, dtype=object), "height": np.array(heights), "width": np.array(widths),
            "error": np.array(errors, dtype=object)}


class CaptionWorker:
    """A Ray Data actor: loads the captioner once (`Captioner.from_pretrained(**options)`) and captions batches
    of decoded images, marker rows passed through."""

    def __init__(self, options: dict[str, Any]):
        from transformers.utils import logging as transformers_logging

        from smallcap.captioner import Captioner

        transformers_logging.disable_progress_bar()  # weight-loading bars from every actor clutter the driver
        self.captioner = Captioner.from_pretrained(**options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["position"])
        captions, retrieved, errors = [""] * count, ["[]"] * count, list(batch["error"])
        todo = [i for i in range(count) if batch["position"][i] >= 0 and not errors[i]]
        images = [np.frombuffer(batch["pixels"][i], np.uint8).reshape(batch["height"][i], batch["width"][i], 3)
                  for i in todo]
        if images:
            for i, result in zip(todo, self.captioner(images, batch_size=len(images))):
                if result.error:
                    errors[i] = result.error
                else:
                    captions[i], retrieved[i] = result.caption, json.dumps(result.retrieved, ensure_ascii=False)
        return {"shard": batch["shard"], "position": batch["position"], "image_id": batch["image_id"],
                "caption": np.array(captions, dtype=object), "retrieved": np.array(retrieved, dtype=object),
                "error": np.array(errors, dtype=object)}


def _write_shard(output_dir: Path, name: str, rows: dict[int, dict], parquet: bool) -> list[dict]:
    ordered = [rows[position] for position in sorted(rows)]
    path = _shard_path(output_dir, name, parquet)
    if parquet:
        atomic_write_parquet(path, ordered, SHARD_COLUMNS)
        return read_parquet_rows(path)  # ids as a rerun reads them back (a mix of ints and strings: strings)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered))
    return ordered


def predict_on_ray(shards: Sequence[InputShard], output: str | os.PathLike, captioner_options: dict[str, Any], *,
                   output_dir: str | os.PathLike | None = None, address: str | None = None, num_workers: int = 1,
                   gpus_per_worker: float = 0.0, batch_size: int = 16, overwrite: bool = False,
                   progress: bool = True) -> RayPredictionReport:
    """Caption `shards` on Ray and write the merged `[{"image_id", "caption"}]` file `output` atomically.

    `captioner_options` are `Captioner.from_pretrained` keyword arguments (each actor loads its own captioner;
    decoding tasks use its `video` and `max_image_pixels`).
    When `output` ends in .parquet/.pq, it and the per-shard files are Parquet tables (an image id column
    mixing ints and strings holds strings), else `output` is the JSON list local `predict` writes and the
    per-shard files are JSONL. Per-shard files (`image_id`, `caption`, `retrieved`, or `error`) go to
    `output_dir/shards/`
    (default: `OUTPUT.shards/` next to `output`); finished shards there are reused on a rerun with the same
    inputs and settings (other ones are refused unless `overwrite`, which redoes every shard). As with local
    `predict`, images that cannot be captioned are left out of the merged file and listed in the report; their
    shards are redone on a rerun.
    """
    output = Path(output)
    output_dir = Path(output_dir) if output_dir is not None else output.with_name(output.name + ".shards")
    check_worker_pool(num_workers, gpus_per_worker)
    if output.is_dir():
        raise SmallCapError(f"--out {output} is a directory; give the predictions file to write")
    parquet = is_parquet(output)
    if parquet:
        require_parquet(f"Writing {output.name}")
    names = [shard.name for shard in shards]
    plan = {"shards": [{"name": s.name, "tar": s.tar, "items": [list(i) for i in s.items]} for s in shards],
            "captioner": json.loads(json.dumps(captioner_options, default=repr)),
            "shard_format": "parquet" if parquet else "jsonl"}
    _check_plan(output_dir, plan, overwrite)
    finished = {name: None if overwrite else read_output_shard(_shard_path(output_dir, name, parquet))
                for name in names}
    todo = [shard for shard in shards if finished[shard.name] is None]
    done_now = 0
    if todo:
        started = connect(address)
        try:
            done_now = _run(todo, output_dir, captioner_options, num_workers, gpus_per_worker, batch_size,
                            finished, progress, parquet)
        finally:
            if started:
                import_ray().shutdown()
    failed: dict[str, str] = {}
    merged, seen = [], {}
    for name in names:
        for row in finished[name] or []:
            key = str(row["image_id"])
            if key in seen:
                raise SmallCapError(f"image id {row['image_id']!r} appears in shards {seen[key]} and {name}; "
                                    "ids must be unique across inputs")
            seen[key] = name
            if "error" in row:
                failed[key] = row["error"]
            else:
                merged.append({"image_id": row["image_id"], "caption": row["caption"]})
    atomic_write_predictions(output, merged)
    return RayPredictionReport(done_now, len(shards) - len(todo), len(merged), failed, output)


def _run(todo: Sequence[InputShard], output_dir: Path, captioner_options: dict, num_workers: int,
         gpus_per_worker: float, batch_size: int, finished: dict, progress: bool, parquet: bool) -> int:
    """Run the pipeline over the unfinished shards; write each shard as soon as all of its rows are back."""
    ray = import_ray()
    from tqdm.auto import tqdm

    quiet_ray_data()
    items = [{"shard": s.name, "tar": s.tar or "", "items": json.dumps([list(i) for i in s.items])} for s in todo]
    dataset = (ray.data.from_items(items, override_num_blocks=len(items))
               .flat_map(_expand)
               # Half a CPU per decode task: unlike the actors' one, this keeps Ray Data from fusing decoding
               # into the captioning actors, so decoding runs in parallel CPU tasks, as planned.
               .map_batches(_decode, batch_size=batch_size, num_cpus=0.5,
                            fn_kwargs={"video_options": captioner_options.get("video"),
                                       "max_pixels": captioner_options.get("max_image_pixels",
                                                                           DEFAULT_MAX_IMAGE_PIXELS)})
               .map_batches(CaptionWorker, fn_constructor_kwargs={"options": captioner_options},
                            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_workers),
                            num_cpus=1, num_gpus=gpus_per_worker or None,
                            # one captioner per node before two on one: more nodes' memory and GPUs in use
                            scheduling_strategy="SPREAD"))
    expected: dict[str, int] = {}
    rows: dict[str, dict[int, dict]] = {shard.name: {} for shard in todo}
    written = 0
    bar = tqdm(total=len(todo), desc="shards", unit="shard", disable=not progress, file=sys.stderr)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["position"])):
            name, position = str(batch["shard"][i]), int(batch["position"][i])
            image_id = json.loads(batch["image_id"][i])
            if position < 0:
                expected[name] = image_id
            elif batch["error"][i]:
                rows[name][position] = {"image_id": image_id, "error": str(batch["error"][i])}
            else:
                rows[name][position] = {"image_id": image_id, "caption": str(batch["caption"][i]),
                                        "retrieved": json.loads(batch["retrieved"][i])}
            if name in expected and len(rows[name]) == expected[name] and finished.get(name) is None:
                finished[name] = _write_shard(output_dir, name, rows.pop(name), parquet)
                rows[name] = {}
                written += 1
                bar.update(1)
    bar.close()
    missing = [shard.name for shard in todo if finished.get(shard.name) is None]
    if missing:
        raise SmallCapError(f"the Ray job ended without results for shards {', '.join(missing[:5])}; "
                            "rerun to redo them")
    return written
