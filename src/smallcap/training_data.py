"""Training data: (image, caption) samples, their retrieved captions, and the batches the decoder trains on.

COCO annotations and Karpathy splits are read by `smallcap.data` (Karpathy text rule "tokens", as the reference
trains); JSONL/CSV/Parquet tables are read here (id: the `image_id` column, else the image file's stem). One sample
per (image, caption) pair, as in the reference.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smallcap.data import image_id_key, read_caption_data
from smallcap.errors import SmallCapError
from smallcap.modeling import PAD_TOKEN_ID
from smallcap.prompt import MAX_CAPTION_TOKENS, collate_training_examples, training_example

TRAIN_SPLITS = ("train", "restval")  # Karpathy's training images, as the reference used them
SAMPLE_FROM = 7  # --sample-k-from-7 draws from the first 7 retrieved captions (what training retrieval keeps)


@dataclass(frozen=True)
class TrainingSample:
    """One training caption: the image it describes (id, and file when known) and its split if the data has one."""

    image_id: str
    caption: str
    image_path: Path | None = None
    split: str | None = None


def read_training_samples(data: str | os.PathLike, images: str | os.PathLike | None = None,
                          split: str | None = None) -> list[TrainingSample]:
    """Read the captions of `data` (COCO annotations, Karpathy json, .jsonl/.csv/.parquet) for a split.

    `split` may list several splits separated by commas. Default: Karpathy's train+restval, a table's "train"
    rows if it has a split column; a COCO file (which has no split field) counts as the split in its name
    (`captions_train2017.json` is "train") and is taken whole. `images` is the image root directory (default:
    for COCO annotations in `annotations/`, the sibling folder named after the file, else the file's folder).
    """
    path = Path(data)
    if not path.is_file():
        raise SmallCapError(f"caption file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv", ".parquet"):
        samples = _read_table(path, Path(images) if images else path.parent)
    elif suffix == ".json":
        content = _load_json(path)
        if isinstance(content, dict) and "annotations" in content:
            samples = _read_coco(path, content, Path(images) if images else _coco_image_root(path))
        elif isinstance(content, dict) and isinstance(content.get("images"), list):
            samples = _read_karpathy(path, content, Path(images) if images else path.parent)
        else:
            raise SmallCapError(f"{path} is neither COCO annotations (images + annotations) nor a Karpathy split "
                                "file (images with sentences)")
    else:
        raise SmallCapError(f"{path}: unknown caption file type {suffix!r} (expected .json, .jsonl, .csv, .parquet)")
    return _select_split(path, samples, split)


def _select_split(path: Path, samples: list[TrainingSample], split: str | None) -> list[TrainingSample]:
    present = sorted({s.split for s in samples if s.split is not None})
    if not present:
        wanted = None
    elif split is None:
        wanted = set(TRAIN_SPLITS)
    else:
        wanted = {s.strip() for s in split.split(",") if s.strip()}
    chosen = samples if wanted is None else [s for s in samples if s.split in wanted]
    if not chosen:
        shown = ",".join(sorted(wanted)) if wanted else "any"
        raise SmallCapError(f"{path} has no captions in split {shown!r} (splits present: {', '.join(present) or 'none'})")
    return chosen


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SmallCapError(f"cannot read {path}: {error}") from error


def _coco_image_root(path: Path) -> Path:
    match = re.match(r"captions_(\w+)\.json$", path.name)
    if match and path.parent.name == "annotations" and (path.parent.parent / match.group(1)).is_dir():
        return path.parent.parent / match.group(1)
    return path.parent


def _read_coco(path: Path, content: dict, root: Path) -> list[TrainingSample]:
    match = re.match(r"captions_([a-z]+)\d*\.json$", path.name)
    split = match.group(1) if match else None
    records = list(read_caption_data(content, path, format="coco"))
    unknown = sorted({image_id_key(r.image_id) for r in records if r.image_file is None})
    if unknown:
        raise SmallCapError(f"{path}: captions refer to {len(unknown)} image ids that are not in its 'images' "
                            f"list, e.g. {', '.join(unknown[:5])}")
    return [TrainingSample(image_id_key(r.image_id), r.caption, root / r.image_file, split) for r in records]


def _read_karpathy(path: Path, content: dict, root: Path) -> list[TrainingSample]:
    # The reference trains on Karpathy's tokens joined by spaces (lower case, no punctuation).
    records = read_caption_data(content, path, format="karpathy", text="tokens")
    return [TrainingSample(image_id_key(r.image_id), r.caption, root / r.image_file if r.image_file else None, r.split)
            for r in records]


def _read_table(path: Path, root: Path) -> list[TrainingSample]:
    """Rows with `caption` and `image_id` and/or `image` (a path relative to `root`), optional `split`."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise SmallCapError("reading .parquet needs pyarrow: pip install 'smallcap[parquet]'") from error
        rows = pq.read_table(path).to_pylist()
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise SmallCapError(f"{path}, line {number}: not JSON ({error})") from error
    samples = []
    for number, row in enumerate(rows, 1):
        image = row.get("image") or row.get("file_name") or row.get("image_path")
        image_id = row.get("image_id") if row.get("image_id") not in (None, "") else (Path(image).stem if image else None)
        if image_id is None or not row.get("caption"):
            raise SmallCapError(f"{path}, row {number}: needs 'caption' and 'image_id' or 'image', got {sorted(row)}")
        samples.append(TrainingSample(str(image_id), str(row["caption"]).strip(), root / image if image else None,
                                      row.get("split") or None))
    return samples


def check_retrieved(retrieved: Mapping[str, Sequence[str]], samples: Sequence[TrainingSample], k: int,
                    source: str = "the retrieved captions") -> None:
    """Every training image needs at least `k` retrieved captions; fail up front, naming a few that lack them."""
    ids = sorted({s.image_id for s in samples})
    missing = [i for i in ids if i not in retrieved]
    if missing:
        raise SmallCapError(f"{source} has no entry for {len(missing)} of {len(ids)} training images, "
                            f"e.g. {', '.join(missing[:5])}")
    short = [i for i in ids if len(retrieved[i]) < k]
    if short:
        raise SmallCapError(f"{source} has fewer than k={k} captions for {len(short)} images, e.g. image "
                            f"{short[0]} has {len(retrieved[short[0]])}")


class CaptionDataset(torch.utils.data.Dataset):
    """Samples as decoder training items: cached encoder states, prompt + caption ids, shifted labels.

    With `sample_k`, each item's prompt uses `k` captions drawn from its retrieved ones (kept in retrieval order)
    by a generator seeded with (seed, epoch, index), so a resumed run draws the same captions.
    """

    def __init__(self, samples: Sequence[TrainingSample], features: Mapping[str, np.ndarray], tokenizer,
                 retrieved: Mapping[str, Sequence[str]] | None, k: int = 4, sample_k: bool = False,
                 seed: int = 42, max_caption_tokens: int = MAX_CAPTION_TOKENS):
        self.samples, self.features, self.tokenizer = list(samples), features, tokenizer
        self.retrieved, self.k, self.sample_k, self.seed = retrieved, k, sample_k, seed
        self.max_caption_tokens = max_caption_tokens
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption draws `sample_k` uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def prompt_captions(self, index: int) -> list[str] | None:
        """The retrieved captions that go into the prompt of item `index` (None without retrieval)."""
        if self.retrieved is None:
            return None
        captions = list(self.retrieved[self.samples[index].image_id])
        if not self.sample_k:
            return captions[:self.k]
        captions = captions[:SAMPLE_FROM]
        draw = random.Random((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        return [captions[i] for i in sorted(draw.sample(range(len(captions)), self.k))]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        input_ids, labels = training_example(self.tokenizer, sample.caption, self.prompt_captions(index), self.k,
                                             self.max_caption_tokens)
        states = torch.from_numpy(np.array(self.features[sample.image_id], dtype=np.float32))  # copy out of the mmap
        return {"encoder_hidden_states": states, "input_ids": input_ids, "labels": labels}


def collate_batch(items: Sequence[dict], pad_token_id: int = PAD_TOKEN_ID) -> dict[str, torch.Tensor]:
    """Stack items into a batch padded to its own longest example (no fixed length budget); inputs are padded
    with `pad_token_id`, the decoder family's `!` (GPT-2's by default)."""
    input_ids, labels = collate_training_examples([(item["input_ids"], item["labels"]) for item in items],
                                                  pad_token_id=pad_token_id)
    states = torch.stack([item["encoder_hidden_states"] for item in items])
    return {"encoder_hidden_states": states, "decoder_input_ids": input_ids, "labels": labels}
