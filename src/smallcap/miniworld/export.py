"""Sample a world's images and captions and write them in the formats our data readers accept.

Per domain, under `OUT/DOMAIN/`:
  images/DOMAIN_000123.png                 the images
  dataset_DOMAIN.json                      Karpathy-style split file (image root: OUT/DOMAIN, filepath "images")
  captions_{train,val,test}.json           COCO-format caption annotations (image root: OUT/DOMAIN/images)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from smallcap.io import atomic_write_json
from smallcap.miniworld.captions import caption_tokens, captions_for
from smallcap.miniworld.world import DOMAINS, IMAGE_SIZE, Scene, render, sample_scene, with_shapes_shifted

SPLITS = ("train", "val", "test")
IMAGE_DIR = "images"
ID_STRIDE = 1_000_000  # image ids: (domain position + 1) * stride + index, unique across domains


@dataclass
class WorldImage:
    """One image of the world: where it belongs, its scene and its reference captions."""

    domain: str
    index: int
    cocoid: int
    split: str
    scene: Scene
    captions: list[str]

    @property
    def filename(self) -> str:
        """The image file's name inside its domain's `images/` folder."""
        return f"{self.domain}_{self.index:06d}.png"


def split_of(index: int) -> str:
    """80/10/10 by index (8 and 9 of every ten are val and test), so splits are stable as the world grows."""
    return {8: "val", 9: "test"}.get(index % 10, "train")


def sample_world(seed: int, images_per_domain: int, domains: list[str] | None = None, stream: str = "data",
                 shape_variants: int = 1) -> list[WorldImage]:
    """Scenes and captions (no pixels) of every domain, deterministic in `seed`.

    The "data" stream is the dataset, split 80/10/10; the "web" stream is a disjoint set of images and
    captions of the same domains (split "web"), what the mini CLIP and GPT-2 are pretrained on. With
    `shape_variants` > 1, consecutive images come in groups that differ only in their objects' shapes.
    """
    if images_per_domain >= ID_STRIDE:
        raise ValueError(f"at most {ID_STRIDE - 1} images per domain")
    images = []
    for position, name in enumerate(domains or list(DOMAINS)):
        for index in range(images_per_domain):
            group, shift = divmod(index, shape_variants)
            scene = with_shapes_shifted(sample_scene(DOMAINS[name], seed, group, stream), DOMAINS[name], shift, index)
            split = split_of(index) if stream == "data" else stream
            images.append(WorldImage(name, index, (position + 1) * ID_STRIDE + index, split, scene,
                                     captions_for(scene, seed)))
    return images


def write_world(images: list[WorldImage], out_dir: str | Path, seed: int, progress: bool = True) -> None:
    """Render every image to PNG and write each domain's Karpathy file and COCO annotations under `out_dir`."""
    out_dir = Path(out_dir)
    for image in tqdm(images, desc="drawing images", unit="img", disable=not progress):
        path = out_dir / image.domain / IMAGE_DIR / image.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        render(image.scene, seed).save(path, optimize=False)
    for domain in sorted({image.domain for image in images}):
        mine = [image for image in images if image.domain == domain]
        atomic_write_json(out_dir / domain / f"dataset_{domain}.json", karpathy_split(mine, domain), indent=None)
        for split in SPLITS:
            atomic_write_json(out_dir / domain / f"captions_{split}.json",
                              coco_annotations([i for i in mine if i.split == split], domain, split), indent=None)


def _sentence_id(image: WorldImage, j: int) -> int:
    return image.cocoid * 10 + j


def karpathy_split(images: list[WorldImage], dataset: str) -> dict:
    """The Karpathy split-file structure; each entry also carries its `scene` for analysis."""
    entries = []
    for imgid, image in enumerate(images):
        sentences = [{"raw": caption, "tokens": caption_tokens(caption), "imgid": imgid,
                      "sentid": _sentence_id(image, j)} for j, caption in enumerate(image.captions)]
        entries.append({"imgid": imgid, "cocoid": image.cocoid, "filepath": IMAGE_DIR, "filename": image.filename,
                        "split": image.split, "sentids": [s["sentid"] for s in sentences],
                        "sentences": sentences, "scene": image.scene.to_json()})
    return {"dataset": dataset, "images": entries}


def coco_annotations(images: list[WorldImage], dataset: str, split: str) -> dict:
    """COCO caption annotations (what pycocoevalcap and our COCO reader expect)."""
    return {
        "info": {"description": f"miniworld {dataset} {split}"},
        "licenses": [],
        "type": "captions",
        "images": [{"id": i.cocoid, "file_name": i.filename, "width": IMAGE_SIZE, "height": IMAGE_SIZE}
                   for i in images],
        "annotations": [{"id": _sentence_id(i, j), "image_id": i.cocoid, "caption": caption}
                        for i in images for j, caption in enumerate(i.captions)],
    }
