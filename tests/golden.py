"""Loading the reference golden packs (`ref-r4` GPT-2, `ref-opt-r4` OPT, `ref-xglm-r8` XGLM; see their READMEs)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from conftest import GOLDEN


class Pack:
    """One golden pack directory: its inputs, the reference's expected outputs and checkpoint."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def load_json(self, name: str):
        return json.loads((self.root / name).read_text())

    def expected(self, name: str):
        path = self.root / "expected" / name
        return np.load(path) if name.endswith(".npy") else json.loads(path.read_text())

    @cached_property
    def decoder_type(self) -> str:
        """The SmallCap decoder family of the checkpoint ("this_gpt2", "this_opt", "this_xglm")."""
        return self.load_json("config.json")["decoder"]["model_type"]

    def image_ids(self) -> list[str]:
        return sorted(self.load_json("images.json"), key=int)

    def image_paths(self) -> list[Path]:
        files = self.load_json("images.json")
        return [self.root / "images" / files[i] for i in self.image_ids()]

    def retrieved(self) -> list[list[str]]:
        table = self.load_json("retrieved_caps.json")
        return [table[i] for i in self.image_ids()]

    def expected_captions(self, name: str) -> list[str]:
        """The reference's captions without its 4.x decode cleanup, stripped (the spec's deliberate deviation)."""
        return [row["caption_if_no_cleanup"].strip() for row in self.expected(name)["per_image"]]


REF_R4 = Pack(GOLDEN)
load_json = REF_R4.load_json
expected = REF_R4.expected
image_ids = REF_R4.image_ids
image_paths = REF_R4.image_paths
retrieved = REF_R4.retrieved
expected_captions = REF_R4.expected_captions
