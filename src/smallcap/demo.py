"""The offline demo: the bundled mini SmallCap captions images once per datastore, side by side.

The bundled model was trained on the miniworld's source domain only (red/green/blue circles, squares,
triangles). Captioning target-domain images (purple/orange/yellow stars, hearts, moons) with the target
datastore instead of the source one shows SmallCap's training-free domain transfer: the words it has never been
trained to produce come from the retrieved captions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from smallcap.captioner import Captioner
from smallcap.errors import SmallCapError
from smallcap.hub import BUNDLE_DIR, BUNDLED_SAMPLES
from smallcap.retrieval.retriever import DatastoreRetriever

DEMO_MODEL = "mini"
DEMO_DATASTORES = ("mini-source", "mini-target")


@dataclass
class DatastoreCaption:
    """The caption of one image with one datastore, and the captions retrieved into its prompt."""

    datastore: str
    caption: str | None
    retrieved: list[str]


@dataclass
class DemoRow:
    """One image captioned once per datastore (or why it could not be)."""

    image: str
    captions: list[DatastoreCaption]
    error: str | None = None


def sample_images() -> list[Path]:
    """The bundled sample images (both miniworld domains), in name order."""
    images = sorted(BUNDLED_SAMPLES.glob("*.png"))
    if not images:
        raise SmallCapError(f"no bundled sample images in {BUNDLED_SAMPLES}; rebuild them with "
                            "`python scripts/build_bundle.py` or reinstall smallcap")
    return images


def sample_references() -> dict[str, str]:
    """A reference caption of each bundled sample image, by file name (from the bundle's `bundle.json`)."""


    try:
        samples = json.loads((BUNDLE_DIR / "bundle.json").read_text(encoding="utf-8"))["samples"]
    except (OSError, ValueError, KeyError):
        return {}
    return {name: captions[0] for name, captions in samples.items() if captions}


def compare_datastores(images: Sequence[str | os.PathLike], model: str = DEMO_MODEL,
                       datastores: Sequence[str] = DEMO_DATASTORES, device: str = "cpu") -> list[DemoRow]:
    """Caption `images` with `model` once per datastore (each a directory or bundled short name)."""
    captioner = Captioner.from_pretrained(model, device=device, use_retrieval=True)
    rows = [DemoRow(str(image), []) for image in images]
    for datastore in datastores:
        captioner.retriever = DatastoreRetriever.from_directories([datastore], vision_model=captioner.model.encoder,
                                                                  device=device)
        for row, result in zip(rows, captioner(list(images))):
            row.error = row.error or result.error
            row.captions.append(DatastoreCaption(datastore, result.caption, result.retrieved))
    return rows


def format_rows(rows: Sequence[DemoRow], retrieved: int = 2, references: dict[str, str] | None = None) -> str:
    """A readable table: per image, each datastore's caption and the top `retrieved` captions behind it (and a
    human reference caption where `references`, keyed by file name, has one)."""
    width = max((len(c.datastore) for row in rows for c in row.captions), default=0) + 6
    lines = []
    for row in rows:
        lines.append(row.image if not row.error else f"{row.image}\n  ERROR: {row.error}")
        if row.error:
            continue
        reference = (references or {}).get(Path(row.image).name)
        if reference:
            lines.append(f"  {'reference:':<{width}} {reference}")
        for entry in row.captions:
            lines.append(f"  {'with ' + entry.datastore + ':':<{width}} {entry.caption}")
            for index, caption in enumerate(entry.retrieved[:retrieved]):
                lines.append(f"  {'retrieved' if index == 0 else '':>{width - 1}}  {caption}")
        lines.append("")
    return "\n".join(lines)
