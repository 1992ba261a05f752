"""Build a whole miniature world in one call: data on disk, tokenizers, mini CLIP, mini GPT-2, and a report.

Layout of the output directory:
  world.json                      seed, sizes, domains and their words, token ids, recipes, metrics, timings
  source/, target/                per domain: images/, dataset_DOMAIN.json, captions_{train,val,test}.json
  models/clip/                    CLIPModel + CLIPTokenizer + CLIPImageProcessor (from_pretrained-ready): the
                                  captioning encoder
  models/retriever/               (when the recipe has one) a second, stronger mini CLIP used only to retrieve,
                                  as the paper retrieves with a larger CLIP than it encodes with
  models/gpt2/                    GPT2LMHeadModel + GPT2Tokenizer ("!" = 0 pad, "." = 13 end)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import random
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from smallcap.errors import SmallCapError
from smallcap.io import atomic_directory, atomic_write_json
from smallcap.miniworld.captions import domain_words
from smallcap.miniworld.clip import ClipRecipe, image_processor, pixel_array, retrieval_metrics, train_clip
from smallcap.miniworld.export import SPLITS, sample_world, write_world
from smallcap.miniworld.lm import PROMPT_HEAD, PROMPT_TAIL, LMRecipe, perplexity_report, smallcap_prompt, train_lm
from smallcap.miniworld.tokenization import prune_clip_tokenizer, train_gpt2_tokenizer
from smallcap.miniworld.world import DOMAINS, IMAGE_SIZE, render
from smallcap.retrieval.encoders import HFCLIPEncoder


def default_clip_tokenizer_dir() -> Path:
    """The real CLIP tokenizer files the mini one is cut from: $SMALLCAP_SHARED/data/tokenizers/clip, by
    default the `shared/` folder beside the repository."""
    shared = os.environ.get("SMALLCAP_SHARED") or Path(__file__).resolve().parents[4] / "shared"
    return Path(shared) / "data" / "tokenizers" / "clip"


@dataclass
class WorldRecipe:
    """How big a world to build and how long to train its models."""

    images_per_domain: int = 3000
    web_images_per_domain: int = 12000  # pretraining images for CLIP and GPT-2, disjoint from the dataset
    shape_variants: int = 3  # web images come in groups differing only in shape (CLIP's hard negatives)
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    # A separate retrieval encoder: the captioning CLIP trained `retriever.steps` steps further (at
    # `retriever.lr`) on the same web images, so it is the stronger of the two. None: retrieve with `clip`.
    retriever: ClipRecipe | None = None
    # The retriever's own web: this many pretraining images per domain (the CLIP's web is its first
    # `web_images_per_domain`), as the paper's retriever saw more data than a small captioning model could use.
    # None: the CLIP's web images.
    retriever_web_images_per_domain: int | None = None
    lm: LMRecipe = field(default_factory=LMRecipe)


PRESETS = {
    "default": WorldRecipe(),
    "small": WorldRecipe(images_per_domain=300, web_images_per_domain=1500,
                         clip=ClipRecipe(steps=900, batch_size=63), lm=LMRecipe(layers=2, steps=750, batch_size=32)),
}


def build_world(out_dir: str | Path, seed: int = 0, recipe: WorldRecipe | None = None,
                clip_tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                progress: bool = True, jobs: int = 1) -> dict:
    """Generate the world under `out_dir` (atomically: complete or absent) and return its `world.json` content.

    With `jobs` >= 2 the mini GPT-2 trains in a second process while the mini CLIP trains in this one, each on
    this process's torch thread count; the models are the same as with `jobs=1` (each training seeds itself).
    """
    if jobs < 1:
        raise SmallCapError(f"jobs must be at least 1, got {jobs}")
    recipe = recipe or PRESETS["default"]
    clip_tokenizer_dir = Path(clip_tokenizer_dir or default_clip_tokenizer_dir())
    if not (clip_tokenizer_dir / "merges.txt").is_file() or not (clip_tokenizer_dir / "vocab.json").is_file():
        raise SmallCapError(f"no CLIP tokenizer (vocab.json, merges.txt) in {clip_tokenizer_dir}; pass the "
                            "directory of CLIP's tokenizer files, or set SMALLCAP_SHARED")
    if Path(out_dir).exists() and not overwrite:
        raise SmallCapError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 2)

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        images = sample_world(seed, recipe.images_per_domain)
        write_world(images, tmp, seed, progress=progress)
        web = sample_world(seed, recipe.web_images_per_domain, stream="web", shape_variants=recipe.shape_variants)
        web_pixels = pixel_array([render(image.scene, seed) for image in web])
        lap("world")
        captions = [c for image in web + images for c in image.captions]
        rng = random.Random(seed)
        # The GPT-2 tokenizer also sees the prompt template, so its words and the blank lines get tokens.
        prompts = [smallcap_prompt(rng.sample(captions, 4)) for _ in range(len(captions) // 20)]
        gpt2_tokenizer = train_gpt2_tokenizer(captions + prompts, tmp / "models" / "gpt2")
        clip_tokenizer = prune_clip_tokenizer(clip_tokenizer_dir, captions, tmp / "models" / "clip")
        lap("tokenizers")

        pool = (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if jobs > 1
                else nullcontext())
        with pool:
            lm_job = (pool.submit(_train_lm_with_threads, web, gpt2_tokenizer, recipe.lm, seed, torch.get_num_threads())
                      if jobs > 1 else None)
            clip_reports = _train_clips(tmp, web, web_pixels, images, clip_tokenizer, recipe, seed, progress, lap)
            lm = (lm_job.result() if lm_job is not None
                  else train_lm(web, gpt2_tokenizer, recipe.lm, seed=seed, progress=progress))
        lm.save_pretrained(tmp / "models" / "gpt2")
        lap("gpt2")
        train = [image for image in images if image.split == "train"]
        language = {domain: perplexity_report(lm, gpt2_tokenizer,
                                              [i for i in images if i.domain == domain and i.split == "test"],
                                              [i for i in train if i.domain == domain], recipe.lm, seed=seed)
                    for domain in DOMAINS}
        lap("gpt2_eval")

        report = _world_json(seed, recipe, images, gpt2_tokenizer, clip_reports["clip"], language, timings)
        if recipe.retriever is not None:
            report["metrics"]["retriever_retrieval"] = clip_reports["retriever"]
        report["environment"]["jobs"] = jobs
        report["timings_s"]["total"] = round(time.perf_counter() - started, 2)
        atomic_write_json(tmp / "world.json", report)
    return report


def _train_clips(tmp: Path, web, web_pixels, images, clip_tokenizer, recipe: WorldRecipe, seed: int, progress: bool,
                 lap) -> dict[str, dict]:
    """Train, save and evaluate the captioning mini CLIP and, when the recipe has one, the separate retriever;
    returns their retrieval reports by name ("clip", "retriever")."""
    reports = {}
    clip = train_clip(web_pixels, [i.captions for i in web], clip_tokenizer, recipe.clip, seed=seed,
                      group_size=recipe.shape_variants, progress=progress)
    clip.save_pretrained(tmp / "models" / "clip")
    image_processor().save_pretrained(tmp / "models" / "clip")
    lap("clip")
    reports["clip"] = _retrieval_report(tmp / "models" / "clip", images, seed)
    lap("clip_eval")
    if recipe.retriever is not None:
        if recipe.retriever_web_images_per_domain:
            web = sample_world(seed, recipe.retriever_web_images_per_domain, stream="web",
                               shape_variants=recipe.shape_variants)
            web_pixels = pixel_array([render(image.scene, seed) for image in web])
        retriever = train_clip(web_pixels, [i.captions for i in web], clip_tokenizer, recipe.retriever,
                               seed=seed + 1, group_size=recipe.shape_variants, progress=progress, init=clip)
        retriever.save_pretrained(tmp / "models" / "retriever")
        clip_tokenizer.save_pretrained(tmp / "models" / "retriever")
        image_processor().save_pretrained(tmp / "models" / "retriever")
        reports["retriever"] = _retrieval_report(tmp / "models" / "retriever", images, seed)
        lap("retriever")
    return reports


def _train_lm_with_threads(web, tokenizer, recipe: LMRecipe, seed: int, threads: int):
    """`train_lm` in a worker process, on the parent's torch thread count (results depend on it)."""
    torch.set_num_threads(threads)
    return train_lm(web, tokenizer, recipe, seed=seed, progress=False)


def _retrieval_report(clip_dir: Path, images, seed: int) -> dict:
    """Per domain: the test images against their own references, and against the train datastore."""
    encoder = HFCLIPEncoder.from_pretrained(str(clip_dir))
    report = {}
    for domain in DOMAINS:
        held_out = [i for i in images if i.domain == domain and i.split == "test"]
        datastore = [c for i in images if i.domain == domain and i.split == "train" for c in i.captions]
        report[domain] = retrieval_metrics(encoder, [render(i.scene, seed) for i in held_out],
                                           [i.scene for i in held_out], [i.captions for i in held_out], datastore)
    return report


def _world_json(seed, recipe, images, gpt2_tokenizer, retrieval, language, timings) -> dict:
    counts = {d: {s: sum(1 for i in images if i.domain == d and i.split == s) for s in SPLITS} for d in DOMAINS}
    return {
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "recipe": asdict(recipe),
        "domains": {name: {"shapes": list(d.shapes), "colours": list(d.colours),
                           "content_words": sorted(domain_words(d)), "images": counts[name],
                           "karpathy": f"{name}/dataset_{name}.json", "image_root": name,
                           "coco_annotations": {s: f"{name}/captions_{s}.json" for s in SPLITS},
                           "coco_image_dir": f"{name}/images"}
                    for name, d in DOMAINS.items()},
        "models": {"clip": "models/clip", "gpt2": "models/gpt2",
                   **({"retriever": "models/retriever"} if recipe.retriever is not None else {})},
        "prompt": {"head": PROMPT_HEAD, "tail": PROMPT_TAIL},
        "tokens": {"pad": "!", "pad_token_id": gpt2_tokenizer.convert_tokens_to_ids("!"),
                   "end": ".", "eos_token_id": gpt2_tokenizer.convert_tokens_to_ids("."),
                   "gpt2_vocab_size": len(gpt2_tokenizer)},
        "metrics": {"retrieval": retrieval, "language_model": language},
        "timings_s": timings,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version()},
    }


def load_world_json(out_dir: str | Path) -> dict:
    """Read a built world's `world.json`."""
    return json.loads((Path(out_dir) / "world.json").read_text(encoding="utf-8"))


def recipe_with(preset: str, images_per_domain: int | None = None, web_images_per_domain: int | None = None,
                clip_steps: int | None = None, lm_steps: int | None = None,
                retriever_steps: int | None = None,
                retriever_web_images_per_domain: int | None = None) -> WorldRecipe:
    """A preset (`default`, `small`) with some sizes overridden; `retriever_steps` adds a separate retrieval
    encoder: the captioning CLIP trained that many steps further at half its learning rate, on
    `retriever_web_images_per_domain` web images per domain (default: the CLIP's)."""
    if retriever_web_images_per_domain and not retriever_steps:
        raise SmallCapError("retriever_web_images_per_domain needs retriever_steps (a separate retriever)")
    base = PRESETS[preset]
    clip = replace(base.clip, steps=clip_steps or base.clip.steps)
    retriever = replace(clip, steps=retriever_steps, lr=clip.lr / 2) if retriever_steps else base.retriever
    return WorldRecipe(images_per_domain=images_per_domain or base.images_per_domain,
                       web_images_per_domain=web_images_per_domain or base.web_images_per_domain,
                       shape_variants=base.shape_variants, clip=clip, retriever=retriever,
                       retriever_web_images_per_domain=retriever_web_images_per_domain,
                       lm=replace(base.lm, steps=lm_steps or base.lm.steps))
