"""Mini CLIP: a small Hugging Face `CLIPModel` for 64x64 images, trained contrastively on every domain.

Like CLIP, which saw the web, it is trained on all domains' training images and captions, so it can
retrieve target-domain captions for target-domain images; the SmallCap decoder later never is.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from smallcap.miniworld.captions import describes_content, mentions
from smallcap.miniworld.optimisation import optimise
from smallcap.miniworld.world import IMAGE_SIZE, Scene

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipRecipe:
    """Architecture and training schedule of the mini CLIP."""

    vision_width: int = 128
    vision_layers: int = 4
    patch_size: int = 16  # 4x4 patches + CLS: 17 encoder states for the captioner to attend to
    text_width: int = 64
    text_layers: int = 2
    projection_dim: int = 64
    max_text_length: int = 77
    steps: int = 1400
    batch_size: int = 126
    captions_per_image: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.05


def mini_clip_config(tokenizer, recipe: ClipRecipe):
    """A `CLIPConfig` sized by `recipe`, with the tokenizer's vocabulary and special-token ids."""
    from transformers import CLIPConfig

    heads = lambda width: max(1, width // 32)  # noqa: E731 - 32-wide heads at every width
    return CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=recipe.text_width,
                         intermediate_size=4 * recipe.text_width, num_hidden_layers=recipe.text_layers,
                         num_attention_heads=heads(recipe.text_width), max_position_embeddings=recipe.max_text_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=recipe.vision_width, intermediate_size=4 * recipe.vision_width,
                           num_hidden_layers=recipe.vision_layers, num_attention_heads=heads(recipe.vision_width),
                           image_size=IMAGE_SIZE, patch_size=recipe.patch_size),
        projection_dim=recipe.projection_dim,
    )


def image_processor():
    """CLIP's preprocessing at the world's image size: no 224 resize, CLIP's mean and std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def pixel_array(images: Sequence[Image.Image]) -> torch.Tensor:
    """Images as one uint8 tensor (n, 3, 64, 64): a quarter of the memory of normalised floats."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """What `image_processor()` does to 64x64 images: scale to [0, 1], then CLIP's mean and std."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def train_clip(pixels: torch.Tensor, captions: Sequence[Sequence[str]], tokenizer, recipe: ClipRecipe,
               seed: int = 0, group_size: int = 1, progress: bool = True, init=None):
    """Train a mini `CLIPModel` contrastively on `pixels` (uint8, from `pixel_array`) and their captions.

    Each step takes a batch of images, each with `recipe.captions_per_image` of its captions (the text
    tower is cheap next to the vision tower, so an image forward pass can serve several positives).
    Consecutive runs of `group_size` images stay together in a batch: made of images that differ only in
    shape (`sample_world(..., shape_variants=...)`), they are the hard negatives that teach shape, which
    colour, place and background otherwise drown out. With `init` (a trained mini `CLIPModel`), a copy of it
    is trained further instead of a new model (the recipe's architecture fields are then not used). Returns the
    model in eval mode.
    """
    from transformers import CLIPModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = (copy.deepcopy(init) if init is not None else CLIPModel(mini_clip_config(tokenizer, recipe))).train()
    per_image = len(captions[0])
    tokens = tokenizer([c for caps in captions for c in caps], padding=True, truncation=True, return_tensors="pt")
    ids = tokens.input_ids.view(len(captions), per_image, -1)
    mask = tokens.attention_mask.view(len(captions), per_image, -1)
    groups, per_batch = len(captions) // group_size, max(1, recipe.batch_size // group_size)
    order: list[int] = []

    def batch_loss(step: int) -> torch.Tensor:
        nonlocal order
        if len(order) < per_batch:
            order += rng.sample(range(groups), groups)
        rows = torch.tensor([g * group_size + j for g in order[:per_batch] for j in range(group_size)])
        order = order[per_batch:]
        which = torch.tensor([rng.sample(range(per_image), recipe.captions_per_image) for _ in rows])
        batch_ids, batch_mask = ids[rows[:, None], which].flatten(0, 1), mask[rows[:, None], which].flatten(0, 1)
        length = int(batch_mask.sum(1).max())
        out = model(input_ids=batch_ids[:, :length], attention_mask=batch_mask[:, :length],
                    pixel_values=normalise(pixels[rows]))
        return multi_caption_loss(out.logits_per_image, recipe.captions_per_image)

    return optimise(model, recipe, batch_loss, "training mini CLIP", progress)


def multi_caption_loss(logits_per_image: torch.Tensor, per_image: int) -> torch.Tensor:
    """CLIP's symmetric contrastive loss with all of an image's captions in the batch: each image picks
    its own captions among all (target spread evenly over them), each caption picks its image."""
    images, texts = logits_per_image.shape
    owner = torch.arange(images).repeat_interleave(per_image)
    targets = (owner[None, :] == torch.arange(images)[:, None]).float() / per_image
    image_to_text = torch.nn.functional.cross_entropy(logits_per_image, targets)
    text_to_image = torch.nn.functional.cross_entropy(logits_per_image.t(), owner)
    return (image_to_text + text_to_image) / 2


def retrieval_metrics(encoder, images: Sequence[Image.Image], scenes: Sequence[Scene],
                      own_captions: Sequence[Sequence[str]], datastore: Sequence[str]) -> dict[str, float]:
    """How well `encoder` (a `RetrievalEncoder`) finds captions for held-out images.

    recall@1/@5: an image's own reference among all references of the held-out images (chance: 5/n).
    content@1: the top caption among the held-out references names exactly the image's shapes and no
    wrong colour; datastore_content@1: the same for the top caption of `datastore` (training captions,
    what SmallCap would put in the prompt). *_chance: the expected value for a random caption.
    """
    image_emb = encoder.embed_images(list(images))
    pool = [c for caps in own_captions for c in caps]
    owner = np.repeat(np.arange(len(images)), [len(caps) for caps in own_captions])
    ranked = np.argsort(-(image_emb @ encoder.embed_texts(pool).T), axis=1)[:, :5]
    hits = owner[ranked] == np.arange(len(images))[:, None]
    store_top = (image_emb @ encoder.embed_texts(list(datastore)).T).argmax(axis=1)
    return {
        "images": len(images),
        "recall@1": float(hits[:, 0].mean()),
        "recall@5": float(hits.any(axis=1).mean()),
        "recall@1_chance": float(np.mean([len(caps) for caps in own_captions]) / len(pool)),
        "content@1": float(np.mean([describes_content(pool[r[0]], s) for r, s in zip(ranked, scenes)])),
        "content@1_chance": _content_chance(pool, scenes),
        "datastore_content@1": float(np.mean([describes_content(datastore[t], s) for t, s in zip(store_top, scenes)])),
        "datastore_content@1_chance": _content_chance(datastore, scenes),
    }


def _content_chance(pool: Sequence[str], scenes: Sequence[Scene]) -> float:
    """Mean over images of the share of `pool` captions that describe the image's content."""
    counts: dict[tuple[frozenset[str], frozenset[str]], int] = {}
    for caption in pool:
        key = mentions(caption)
        counts[key] = counts.get(key, 0) + 1
    shares = []
    for scene in scenes:
        shapes, colours = {o.shape for o in scene.objects}, {o.colour for o in scene.objects}
        shares.append(sum(n for (s, c), n in counts.items() if s == shapes and c <= colours) / len(pool))
    return float(np.mean(shares))
