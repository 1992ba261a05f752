"""Loading the reference golden pack `ref-r4` (see its README) for parity tests."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from conftest import GOLDEN


@lru_cache(maxsize=None)
def load_json(name: str):
    return json.loads((GOLDEN / name).read_text())


def expected(name: str):
    path = GOLDEN / "expected" / name
    return np.load(path) if name.endswith(".npy") else json.loads(path.read_text())


def image_ids() -> list[str]:
    return sorted(load_json("images.json"), key=int)


def image_paths() -> list:
    files = load_json("images.json")
    return [GOLDEN / "images" / files[i] for i in image_ids()]


def retrieved() -> list[list[str]]:
    table = load_json("retrieved_caps.json")
    return [table[i] for i in image_ids()]


def expected_captions(name: str) -> list[str]:
    """The reference's captions without its 4.x decode cleanup, stripped (the spec's deliberate deviation)."""
    return [row["caption_if_no_cleanup"].strip() for row in expected(name)["per_image"]]
