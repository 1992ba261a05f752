"""Datastore kinds of the miniature world, as the paper compares them: a large noisy *web* corpus and a small clean
*human-labelled* one, both covering every domain, neither sharing an image with the dataset.

The web corpus is alt-text-like: one caption per image, of which only some describe the image. The rest are vague
(no shape named), describe another image (of any domain), or are about something else entirely. The human corpus
has the dataset's five careful captions per image, but few images. Both are drawn from their own streams of
scenes, so no image of them is a dataset (or pretraining) image. Written as JSONL (`image_id`, `caption`), which
`smallcap datastore build` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from smallcap.io import atomic_write_text
from smallcap.miniworld.captions import captions_for
from smallcap.miniworld.world import BACKGROUNDS, COLOURS, DOMAINS, sample_scene, scene_rng

# Alt text that is about the page, not the picture (words the world's captions never use).
UNRELATED = ("click here to download the full size version", "free wallpaper for your phone",
             "photo of our new office", "best deals of the week", "my favourite picture from the holidays",
             "logo of the company", "image may contain text", "thumbnail", "untitled picture",
             "screenshot from the video")
VAGUE = ("some shapes {B}", "an abstract picture {B}", "a simple drawing", "colourful shapes {B}",
         "a {c} thing {B}", "a picture with a {c} object", "geometric art", "a {bg} background")


@dataclass(frozen=True)
class WebNoise:
    """Shares of web captions that are vague, describe another image, or are unrelated (the rest are right)."""

    vague: float = 0.2
    wrong: float = 0.2
    unrelated: float = 0.15


def web_corpus(seed: int, images_per_domain: int, noise: WebNoise = WebNoise()) -> list[dict]:
    """`images_per_domain` web images per domain, one alt-text-like caption each: `[{image_id, caption, kind}]`
    where kind is right / vague / wrong / unrelated (for analysis; datastores read only the caption)."""
    scenes = [sample_scene(DOMAINS[name], seed, index, stream="webtext")
              for name in DOMAINS for index in range(images_per_domain)]
    records = []
    for position, scene in enumerate(scenes):
        rng = scene_rng(seed, scene.domain, scene.index, "alt-text", scene.stream)
        draw = rng.random()
        if draw < noise.vague:
            kind = "vague"
            colour = rng.choice([o.colour for o in scene.objects])
            bg = rng.choice(BACKGROUNDS[scene.background][1])
            caption = rng.choice(VAGUE).format(B=f"on a {bg} background", bg=bg, c=rng.choice(COLOURS[colour].words))
        elif draw < noise.vague + noise.wrong:
            kind = "wrong"
            caption = rng.choice(captions_for(rng.choice(scenes), seed))
        elif draw < noise.vague + noise.wrong + noise.unrelated:
            kind, caption = "unrelated", rng.choice(UNRELATED)
        else:
            kind, caption = "right", rng.choice(captions_for(scene, seed))
        records.append({"image_id": f"web-{position}", "caption": caption, "kind": kind})
    return records


def human_corpus(seed: int, images_per_domain: int) -> list[dict]:
    """`images_per_domain` images per domain with five careful captions each: `[{image_id, caption}]`."""
    records = []
    for name in DOMAINS:
        for index in range(images_per_domain):
            scene = sample_scene(DOMAINS[name], seed, index, stream="human")
            records += [{"image_id": f"human-{name}-{index}", "caption": caption}
                        for caption in captions_for(scene, seed)]
    return records


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Write records as JSON lines, atomically; returns the path."""
    atomic_write_text(Path(path), "".join(json.dumps(record) + "\n" for record in records))
    return Path(path)

