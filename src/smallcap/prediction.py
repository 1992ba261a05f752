"""Predictions over a whole split: the images of a dataset, captioned in batches, resumably, into the standard
`[{"image_id", "caption"}]` file that `smallcap evaluate` scores."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from smallcap.captioner import Captioner
from smallcap.data import ImageId
from smallcap.errors import SmallCapError
from smallcap.io import atomic_write_json, atomic_write_predictions, is_parquet, read_parquet_rows, require_parquet

@dataclass
class PredictionReport:
    """What a `predict` run did: captioned now, skipped as already done, failed (id -> reason)."""

    captioned: int
    resumed: int
    failed: dict
    output: Path


def _read_output(path: Path) -> dict[str, str]:
    """Captions of a finished predictions file, JSON or Parquet (empty if there is none or it is not one)."""
    try:
        rows = read_parquet_rows(path) if is_parquet(path) else json.loads(path.read_text(encoding="utf-8"))
        return {str(row["image_id"]): row["caption"] for row in rows}
    except (OSError, ValueError, KeyError, TypeError, SmallCapError):
        return {}


def _read_partial(path: Path) -> dict[str, str]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[str(row["image_id"])] = row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut off by an interruption: that image is captioned again
    return done


def settings_path(output: str | os.PathLike) -> Path:
    """Where `predict --out` and `caption --output` record the settings their file is made with:
    `OUT.settings.json`."""
    output = Path(output)
    return output.with_name(output.name + ".settings.json")


def check_resume_settings(output: str | os.PathLike, settings: dict, overwrite: bool = False,
                          recorded_defaults: dict | None = None) -> None:
    """Before any work: record `settings` for `output`, or refuse when an earlier run (finished or not) made it
    with other settings. With `overwrite` the earlier run's progress is discarded instead. `recorded_defaults`
    gives the value an earlier record that lacks a key (made before that setting existed) was made with."""
    output = Path(output)
    partial = output.with_name(output.name + ".partial.jsonl")
    record = settings_path(output)
    if overwrite:
        partial.unlink(missing_ok=True)
    elif record.exists():
        try:
            earlier = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise SmallCapError(f"{record}: unreadable settings of an earlier run ({error}); pass --overwrite to "
                                "start again") from None
        earlier = {**(recorded_defaults or {}), **earlier}
        changed = {key: (earlier.get(key), value) for key, value in settings.items() if earlier.get(key) != value}
        if changed and (output.exists() or partial.exists()):
            detail = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in changed.items())
            raise SmallCapError(f"{output} was made with other settings ({detail}); resuming would mix two "
                                "configurations in one file. Write to another output file, or pass --overwrite to start again")
    elif output.exists() or partial.exists():
        print(f"warning: {output} has no record of the settings it was made with ({record.name}); resuming it "
              "as if they were the same", file=sys.stderr)
    atomic_write_json(record, settings)


def predict(captioner: Captioner, images: Sequence[tuple[ImageId, Path]], output: str | os.PathLike,
            retrieved: dict[str, list[str]] | None = None, features=None, batch_size: int = 16,
            progress: bool = True, overwrite: bool = False) -> PredictionReport:
    """Caption `images` and write `[{"image_id", "caption"}]` to `output` atomically (a Parquet table with
    these columns when `output` ends in .parquet/.pq, else JSON).

    Progress is appended to `output.partial.jsonl`, so an interrupted run continues where it stopped; images
    already in a finished `output` are kept too. With `features` (a FeatureCache of this model's encoder), cached
    encoder states replace the vision forward pass when the prompt needs no images (retrieved captions given,
    or no retrieval). `overwrite` starts again, ignoring both. With retrieved captions given, images are decoded
    in order of prompt length (less padding; same captions).
    """
    if batch_size < 1:
        raise SmallCapError(f"batch size must be at least 1, got {batch_size}")
    output = Path(output)
    if is_parquet(output):
        require_parquet(f"Writing {output.name}")
    partial = output.with_name(output.name + ".partial.jsonl")
    if overwrite:
        partial.unlink(missing_ok=True)
    done = {} if overwrite else {**_read_output(output), **_read_partial(partial)}
    todo = [(image_id, path) for image_id, path in images if str(image_id) not in done]
    if retrieved is not None:
        missing = [str(i) for i, _ in todo if str(i) not in retrieved]
        if missing:
            raise SmallCapError(f"no retrieved captions for image ids {', '.join(missing[:5])}"
                                f"{' ...' if len(missing) > 5 else ''}")
        empty = [str(i) for i, _ in todo if not retrieved[str(i)]]
        if empty and captioner.use_retrieval:
            raise SmallCapError(f"empty list of retrieved captions for image ids {', '.join(empty[:5])}"
                                f"{' ...' if len(empty) > 5 else ''}; the prompt needs at least one "
                                "(or pass --no-retrieval)")
    if retrieved is not None and captioner.use_retrieval:
        # Batches of similar prompt lengths waste less work on left padding. Batched decoding is exact, so the
        # captions are those of any other order; the output file keeps the input order.
        todo.sort(key=lambda item: captioner.prompt_length(retrieved[str(item[0])]))
    use_features = features is not None and (retrieved is not None or not captioner.use_retrieval)
    failed: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc="predicting", unit="image", disable=not progress, file=sys.stderr)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a", encoding="utf-8") as log:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            caps = None if retrieved is None else [retrieved[str(i)] for i, _ in batch]
            if use_features and all(str(i) in features for i, _ in batch):
                states = torch.from_numpy(np.stack([features[str(i)] for i, _ in batch]))
                captions = captioner.caption_encoded(states.float(), caps if captioner.use_retrieval else None)
                results = [(i, c, None) for (i, _), c in zip(batch, captions)]
            else:
                outcome = captioner([path for _, path in batch], retrieved=caps, batch_size=batch_size)
                results = [(i, r.caption, r.error) for (i, _), r in zip(batch, outcome)]
            for image_id, caption, error in results:
                if error:
                    failed[str(image_id)] = error
                else:
                    done[str(image_id)] = caption
                    log.write(json.dumps({"image_id": image_id, "caption": caption}, ensure_ascii=False) + "\n")
            log.flush()
            bar.update(len(batch))
    bar.close()
    order = {str(image_id): image_id for image_id, _ in images}
    rows = [{"image_id": order[key], "caption": done[key]} for key in order if key in done]
    atomic_write_predictions(output, rows)
    if not failed:
        partial.unlink(missing_ok=True)
    return PredictionReport(len(todo) - len(failed), len(images) - len(todo), failed, output)
