"""Mini GPT-2: a small Hugging Face `GPT2LMHeadModel` trained on the world's captions as SmallCap prompts.

Real GPT-2 arrives at SmallCap able to continue a caption-like text and to copy words it has just read.
The mini GPT-2 gets both from its training text: captions of every domain, most of them written after a
SmallCap prompt whose "similar images" are captions of other images with the same or overlapping content
(never the image's own captions, as in SmallCap's training retrieval). The contexts are noisy on purpose,
so copying pays off for the content words but the model cannot learn to copy blindly, and nothing in them
comes from the image, so what the decoder later learns about images it must learn in SmallCap training.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from smallcap.miniworld.export import WorldImage
from smallcap.miniworld.optimisation import optimise
from smallcap.prompt import TEMPLATE, build_prompt

# SmallCap's prompt (smallcap.prompt): k captions joined by blank lines, one "." after the last one.
PROMPT_HEAD, PROMPT_TAIL = TEMPLATE.split("||")


def smallcap_prompt(captions: Sequence[str]) -> str:
    """The SmallCap prompt for retrieved `captions` (the no-retrieval prompt when there are none)."""
    return build_prompt(list(captions) or None, k=len(captions))


@dataclass
class LMRecipe:
    """Architecture, training text and schedule of the mini GPT-2."""

    width: int = 128
    layers: int = 3
    heads: int = 4
    positions: int = 256
    k: int = 4
    no_retrieval_share: float = 0.15  # sequences with the plain "This image shows " prompt
    exact_share: float = 0.6  # a context caption comes from an image with the same content,
    partial_share: float = 0.3  # from one with overlapping content, or else from any image of the domain
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05


def mini_gpt2_config(tokenizer, recipe: LMRecipe):
    """A `GPT2Config` sized by `recipe`, with the tokenizer's vocabulary and `<|endoftext|>` as GPT-2 has it."""
    from transformers import GPT2Config

    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.positions, n_embd=recipe.width,
                      n_layer=recipe.layers, n_head=recipe.heads, bos_token_id=end, eos_token_id=end)


def _content(image: WorldImage) -> frozenset[tuple[str, str]]:
    return frozenset((o.shape, o.colour) for o in image.scene.objects)


class ContextSampler:
    """Draws "similar images" captions for an image from a pool of images of its domain (never itself)."""

    def __init__(self, pool: Sequence[WorldImage], recipe: LMRecipe):
        self.recipe = recipe
        self.by_domain: dict[str, list[WorldImage]] = {}
        for image in pool:
            self.by_domain.setdefault(image.domain, []).append(image)
        self.by_content: dict[tuple[str, frozenset], list[WorldImage]] = {}
        self.by_pair: dict[tuple[str, tuple[str, str]], list[WorldImage]] = {}
        for image in pool:
            self.by_content.setdefault((image.domain, _content(image)), []).append(image)
            for pair in _content(image):
                self.by_pair.setdefault((image.domain, pair), []).append(image)

    def sample(self, image: WorldImage, rng: random.Random) -> list[str]:
        """k captions, most similar content first (as a retriever ranks them)."""
        content = _content(image)
        picks = []
        for _ in range(self.recipe.k):
            roll = rng.random()
            if roll < self.recipe.exact_share:
                candidates = self.by_content.get((image.domain, content), [])
            elif roll < self.recipe.exact_share + self.recipe.partial_share:
                candidates = self.by_pair.get((image.domain, rng.choice(sorted(content))), [])
            else:
                candidates = self.by_domain[image.domain]
            candidates = [c for c in candidates if c.cocoid != image.cocoid] or \
                [c for c in self.by_domain[image.domain] if c.cocoid != image.cocoid]
            other = rng.choice(candidates)
            overlap = len(content & _content(other)) / len(content | _content(other))
            picks.append((-overlap, rng.random(), rng.choice(other.captions)))
        return [caption for *_, caption in sorted(picks)]


def training_texts(images: Sequence[WorldImage], sampler: ContextSampler, count: int, recipe: LMRecipe,
                   rng: random.Random) -> list[tuple[str, str]]:
    """`count` (prompt, caption) pairs: a random image's random caption after a SmallCap prompt."""
    pairs = []
    for _ in range(count):
        image = rng.choice(images)
        context = [] if rng.random() < recipe.no_retrieval_share else sampler.sample(image, rng)
        pairs.append((smallcap_prompt(context), rng.choice(image.captions)))
    return pairs


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, caption ids + end token) per pair, prompt and caption encoded separately as SmallCap does."""
    end = tokenizer.convert_tokens_to_ids(".")
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False).input_ids
    captions = tokenizer([c for _, c in pairs], add_special_tokens=False).input_ids
    return [(p, c + [end]) for p, c in zip(prompts, captions)]


def _batch(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, captions_only: bool):
    """Right-padded input ids, attention mask and labels (-100 on padding, and on the prompt if asked)."""
    length = max(len(p) + len(c) for p, c in encoded)
    ids = torch.full((len(encoded), length), pad_id)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), -100)
    for row, (prompt, caption) in enumerate(encoded):
        sequence = prompt + caption
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
        labels[row, len(prompt) if captions_only else 0:len(sequence)] = torch.tensor(
            caption if captions_only else sequence)
    return ids, mask, labels


def train_lm(images: Sequence[WorldImage], tokenizer, recipe: LMRecipe, seed: int = 0, progress: bool = True):
    """Train a mini `GPT2LMHeadModel` on SmallCap-formatted caption text of `images`; returns it in eval mode."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = GPT2LMHeadModel(mini_gpt2_config(tokenizer, recipe)).train()
    sampler = ContextSampler(images, recipe)
    encoded = encode_pairs(tokenizer, training_texts(images, sampler, recipe.steps * recipe.batch_size, recipe, rng))
    pad = tokenizer.convert_tokens_to_ids("!")

    def batch_loss(step: int) -> torch.Tensor:
        ids, mask, labels = _batch(encoded[step * recipe.batch_size:(step + 1) * recipe.batch_size], pad, False)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return optimise(model, recipe, batch_loss, "training mini GPT-2", progress)


@torch.inference_mode()
def perplexity(model, tokenizer, pairs: Sequence[tuple[str, str]], captions_only: bool, batch_size: int = 64) -> float:
    """exp(mean token cross-entropy) over the captions (and end token) only, or over whole sequences."""
    pad = tokenizer.convert_tokens_to_ids("!")
    encoded = encode_pairs(tokenizer, pairs)
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        ids, mask, labels = _batch(encoded[start:start + batch_size], pad, captions_only)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum")
        total += losses.item()
        count += int((targets != -100).sum())
    return math.exp(total / count)


def perplexity_report(model, tokenizer, images: Sequence[WorldImage], pool: Sequence[WorldImage],
                      recipe: LMRecipe, seed: int = 0) -> dict[str, float]:
    """Perplexities on held-out `images` (contexts drawn from `pool`, the training images):
    whole SmallCap-formatted sequences, and the caption alone after a prompt with and without similar
    captions; the gap between the last two is how much the model uses the captions it is shown."""
    rng = random.Random(seed)
    sampler = ContextSampler(pool, recipe)
    with_context = [(smallcap_prompt(sampler.sample(i, rng)), c) for i in images for c in i.captions]
    without = [(smallcap_prompt([]), c) for i in images for c in i.captions]
    return {
        "sequence_ppl": perplexity(model, tokenizer, with_context, captions_only=False),
        "caption_ppl_with_similar_captions": perplexity(model, tokenizer, with_context, captions_only=True),
        "caption_ppl_without_context": perplexity(model, tokenizer, without, captions_only=True),
    }
