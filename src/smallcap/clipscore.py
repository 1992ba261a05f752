"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021): how well a caption fits its image, by a CLIP model.

    CLIP-S(c, v)       = w * max(cos(c, v), 0)                             w = 2.5
    RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and max(max_r cos(c, r), 0), r in the references R

c, v, r are the CLIP embeddings of the caption, the image and each reference caption. As in the authors'
code, every caption (candidate and reference) is embedded with the prefix "A photo depicts " and the corpus
score is the mean of the per-image scores. `smallcap.evaluation` reports both x100, like its other metrics.
A video is scored as the tiled image of its frames that SmallCap captions (`smallcap.images.load_image`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from smallcap.errors import SmallCapError
from smallcap.images import VideoOptions, find_media, load_image
from smallcap.retrieval.encoders import RetrievalEncoder

ImageId = int | str
W = 2.5  # Hessel et al.'s rescaling: CLIP cosines of matching pairs rarely exceed 0.4
PREFIX = "A photo depicts "


def clip_scores(images: np.ndarray, captions: np.ndarray,
                references: Sequence[np.ndarray], w: float = W) -> tuple[np.ndarray, np.ndarray]:
    """Per-item (CLIP-S, RefCLIP-S), unscaled, from unit-norm embeddings.

    `images` and `captions`: (n, d), row i the image and its candidate caption; `references[i]`: (m_i, d),
    the reference captions of image i (m_i >= 1).
    """
    clip_s = w * np.clip(np.sum(images * captions, axis=1), 0.0, None)
    ref_s = np.array([max(float(np.max(refs @ caption)), 0.0) for refs, caption in zip(references, captions)])
    total = clip_s + ref_s
    # Both parts 0 (caption orthogonal to or opposite everything) gives 0, not 0/0.
    ref_clip_s = np.divide(2 * clip_s * ref_s, total, out=np.zeros_like(total), where=total > 0)
    return clip_s, ref_clip_s


def find_images(ids: Sequence[ImageId], files: Mapping[ImageId, str], images_dir: str | os.PathLike,
                source: str = "references") -> dict[ImageId, Path]:
    """Each image's file: its file name from the references (`images_dir/name`, else `images_dir/basename`),
    else `images_dir/<image_id>.<ext>` for any image or video extension."""
    root = Path(images_dir)
    if not root.is_dir():
        raise SmallCapError(f"--images-dir {root} is not a directory")
    found: dict[ImageId, Path] = {}
    missing: list[str] = []
    for image_id in ids:
        name = files.get(image_id)
        candidates = [root / name, root / Path(name).name] if name else []
        path = next((c for c in candidates if c.is_file()), None) or find_media(root, image_id)
        if path is None:
            missing.append(f"{image_id} ({name or f'{image_id}.jpg, .png, .mp4, ...'})")
        else:
            found[image_id] = path
    if missing:
        raise SmallCapError(f"{len(missing)} of {len(ids)} images for CLIPScore are not in {root}, e.g. image "
                            f"{missing[0]}; --images-dir should be the folder that holds the files {source} names, "
                            "or <image_id>.<ext> files")
    return found


class CLIPScorer:
    """Scores captions of a fixed set of images with one CLIP encoder (any `RetrievalEncoder`).

    Image and text embeddings are cached, so scoring subsets again (nocaps domains) costs no model calls.
    """

    def __init__(self, encoder: RetrievalEncoder, images: Mapping[ImageId, Path], batch_size: int = 32,
                 video_options: VideoOptions | None = None, progress: bool = True):
        self.encoder = encoder
        self.images = dict(images)
        self.batch_size = batch_size
        self.video_options = video_options
        self.progress = progress
        self._image_cache: dict[ImageId, np.ndarray] = {}
        self._text_cache: dict[str, np.ndarray] = {}

    def _embed_images(self, ids: Sequence[ImageId]) -> np.ndarray:
        todo = [i for i in dict.fromkeys(ids) if i not in self._image_cache]
        starts = range(0, len(todo), self.batch_size)
        for start in tqdm(starts, desc="CLIPScore images", unit="batch", file=sys.stderr,
                          disable=not self.progress or len(starts) < 2, leave=False):
            chunk = todo[start:start + self.batch_size]  # decoded a batch at a time: 5k COCO images are ~5 GB
            pictures = [load_image(self.images[i], self.video_options) for i in chunk]
            self._image_cache.update(zip(chunk, self.encoder.embed_images(pictures, batch_size=self.batch_size)))
        return np.stack([self._image_cache[i] for i in ids])

    def _embed_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            vectors = self.encoder.embed_texts([PREFIX + t for t in todo], progress=self.progress)
            self._text_cache.update(zip(todo, vectors))
        return self._text_cache

    def __call__(self, ids: Sequence[ImageId], captions: Mapping[ImageId, str],
                 references: Mapping[ImageId, Sequence[str]]) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Corpus (mean) and per-image CLIPScore and RefCLIPScore of `captions[i]` for each image in `ids`,
        unscaled (CLIPScore in [0, 2.5])."""
        images = self._embed_images(ids)
        texts = self._embed_texts([captions[i] for i in ids] + [r for i in ids for r in references[i]])
        clip_s, ref_clip_s = clip_scores(images, np.stack([texts[captions[i]] for i in ids]),
                                         [np.stack([texts[r] for r in references[i]]) for i in ids])
        return ({"CLIPScore": float(clip_s.mean()), "RefCLIPScore": float(ref_clip_s.mean())},
                {"CLIPScore": clip_s.tolist(), "RefCLIPScore": ref_clip_s.tolist()})
