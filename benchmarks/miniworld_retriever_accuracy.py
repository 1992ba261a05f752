#!/usr/bin/env python
"""How often a retriever recipe's top datastore caption names the right objects, on a small world's held-out images.

Trains the small preset's captioning mini CLIP for a seed, then each retriever variant from it, and scores every
model on the val and test images of the same world grown to 3,000 images per domain beyond the small world's first
300 (540 per domain: far less noisy than the 30 test images of a small run), retrieving from the small world's
training captions. Variants:
  cont             the captioning CLIP trained 1,800 steps further at half its learning rate on its own web
                   (`--retriever-steps 1800`)
  web<N>_<S>       the same, S steps on N web images per domain (`--retriever-steps S
                   --retriever-web-images-per-domain N`)

    python benchmarks/miniworld_retriever_accuracy.py --seed 0 --variants cont,web10000_1800,web30000_3600
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="cont,web10000_1800,web30000_3600")
    parser.add_argument("--out", type=Path, help="default: results/miniworld_retriever_accuracy_seedN.json")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    for variant in variants:
        if variant != "cont" and not re.fullmatch(r"web\d+_\d+", variant):
            parser.error(f"unknown variant {variant!r}: cont or web<N>_<S>")

    import torch

    from smallcap.io import atomic_write_json
    from smallcap.miniworld.build import PRESETS, default_clip_tokenizer_dir
    from smallcap.miniworld.clip import image_processor, pixel_array, retrieval_metrics, train_clip
    from smallcap.miniworld.export import sample_world
    from smallcap.miniworld.tokenization import prune_clip_tokenizer
    from smallcap.miniworld.world import DOMAINS, render
    from smallcap.retrieval.encoders import HFCLIPEncoder

    torch.set_num_threads(1)
    seed, small = args.seed, PRESETS["small"]
    out = args.out or RESULTS / f"miniworld_retriever_accuracy_seed{seed}.json"
    data = sample_world(seed, 3000)
    train = [i for i in data if i.index < small.images_per_domain and i.split == "train"]
    held = [i for i in data if i.index >= small.images_per_domain and i.split in ("val", "test")]
    web = sample_world(seed, small.web_images_per_domain, stream="web", shape_variants=small.shape_variants)
    captions = [c for image in web + [i for i in data if i.index < small.images_per_domain] for c in image.captions]
    tokenizer = prune_clip_tokenizer(default_clip_tokenizer_dir(), captions, Path(tempfile.mkdtemp()))
    held_images = {d: [render(i.scene, seed) for i in held if i.domain == d] for d in DOMAINS}

    def accuracy(model, name: str) -> dict:
        encoder = HFCLIPEncoder(model, image_processor(), tokenizer, name)
        report = {}
        for domain in DOMAINS:
            mine = [i for i in held if i.domain == domain]
            store = [c for i in train if i.domain == domain for c in i.captions]
            metrics = retrieval_metrics(encoder, held_images[domain], [i.scene for i in mine],
                                        [i.captions for i in mine], store)
            report[domain] = round(metrics["datastore_content@1"], 3)
        return report

    def trained(images, recipe, **kwargs):
        pixels = pixel_array([render(i.scene, seed) for i in images])
        return train_clip(pixels, [i.captions for i in images], tokenizer, recipe, group_size=small.shape_variants,
                          progress=False, **kwargs)

    results = {"seed": seed, "held_out_images_per_domain": len(held) // len(DOMAINS), "models": {}}
    started = time.perf_counter()
    clip = trained(web, small.clip, seed=seed)
    results["models"]["clip"] = {**accuracy(clip, "clip"), "seconds": round(time.perf_counter() - started)}
    for variant in variants:
        started = time.perf_counter()
        if variant == "cont":
            images, steps = web, 1800
        else:
            count, steps = map(int, variant[3:].split("_"))
            images = sample_world(seed, count, stream="web", shape_variants=small.shape_variants)
        model = trained(images, replace(small.clip, steps=steps, lr=small.clip.lr / 2), seed=seed + 1, init=clip)
        results["models"][variant] = {**accuracy(model, variant), "seconds": round(time.perf_counter() - started)}
        print(variant, results["models"][variant], flush=True)
        atomic_write_json(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
