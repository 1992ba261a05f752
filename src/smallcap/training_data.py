"""Training data: (image, caption) samples, their retrieved captions, and the batches the decoder trains on.

Caption files are read by `smallcap.data` (the one reader): COCO annotations, Karpathy splits (text rule
"tokens", as the reference trains), JSON lists of objects and JSONL/CSV/Parquet tables (strict rows: each names its
image by an `image_id` field or an image file, whose stem is then the id). One sample per (image, caption) pair,
as in the reference; image ids are `image_id_key` strings.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from smallcap.data import (default_image_root, detect_format, image_id_key, json_format, load_json,
                           read_caption_data, read_captions)
from smallcap.errors import SmallCapError
from smallcap.modeling import PAD_TOKEN_ID
from smallcap.prompt import MAX_CAPTION_TOKENS, collate_training_examples, training_example

TRAIN_SPLITS = ("train", "restval")  # Karpathy's training images, as the reference used them
SAMPLE_FROM = 7  # --sample-k-from-7 draws from the first 7 retrieved captions (what training retrieval keeps)
TRAINING_FORMATS = ("coco", "karpathy", "json", "jsonl", "csv", "parquet")


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
    `smallcap.data.default_image_root`: for COCO annotations in `annotations/`, the sibling folder named after
    the file, else the file's folder).
    """
    path = Path(data)
    if not path.is_file():
        raise SmallCapError(f"caption file {path} does not exist")
    fmt = detect_format(path)
    if fmt == "json":
        content = load_json(path, "caption")
        fmt = json_format(content)
        records = None if fmt not in TRAINING_FORMATS else \
            list(read_caption_data(content, path, fmt, text="tokens", strict=True))
    elif fmt in TRAINING_FORMATS:
        records = list(read_captions(path, fmt, strict=True))
    else:
        records = None
    if records is None:
        raise SmallCapError(f"{path}: {fmt} captions cannot be trained on; expected COCO caption annotations, a "
                            "Karpathy split file, a JSON list of objects or a .jsonl/.csv/.parquet table with "
                            "'caption' and 'image_id' and/or 'image' columns")
    root = Path(images) if images else default_image_root(path)
    if fmt == "coco":
        unknown = sorted({image_id_key(r.image_id) for r in records if r.image_file is None})
        if unknown:
            raise SmallCapError(f"{path}: captions refer to {len(unknown)} image ids that are not in its 'images' "
                                f"list, e.g. {', '.join(unknown[:5])}")
        match = re.match(r"captions_([a-z]+)\d*\.json$", path.name)
        records = [replace(r, split=match.group(1) if match else None) for r in records]
    samples = [TrainingSample(image_id_key(r.image_id), r.caption, root / r.image_file if r.image_file else None,
                              r.split) for r in records]
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
