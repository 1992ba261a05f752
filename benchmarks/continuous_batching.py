"""Continuous batching on a trained model, whose captions have different lengths: transformers `generate` per batch
(each batch runs to its longest caption) versus smallcap's beam search per batch (finished images leave the batch)
versus all images through one call with a batch's worth in flight (finished images replaced by waiting ones).

The bundled `mini` model (trained; the real-size random-weight model of caption_throughput.py gives 25-token
captions nearly always), real coco-mini images, k=4 captions retrieved from `mini-source`, beam 3, 25 new tokens.
Decoding only (encoder states and prompts are computed once, before timing); the three variants alternate for
`--repeats` rounds in one process and the median is reported, with the captions' token counts.

    python benchmarks/continuous_batching.py [--images 64] [--batch-size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from smallcap.captioner import Captioner
from smallcap.generation import generate, generate_with_transformers
from smallcap.images import load_image
from smallcap.prompt import prompt_ids

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared"))


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; write JSON and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/continuous_batching.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    coco = SHARED / "data/coco-mini"
    paths = (sorted((coco / "val2017").glob("*.jpg")) + sorted((coco / "train2017").glob("*.jpg")))[:args.images]
    captioner = Captioner.from_pretrained("mini", datastores=["mini-source"])
    images = [load_image(path) for path in paths]
    states = captioner.encode(images)
    prompts = [prompt_ids(captioner.tokenizer, caps, captioner.k)
               for caps in captioner.retriever(images, states, captioner.k)]
    model, size = captioner.model, args.batch_size
    batches = [(prompts[i:i + size], states[i:i + size]) for i in range(0, len(prompts), size)]
    variants = {
        "transformers generate per batch (earlier path)":
            lambda: [ids for p, s in batches for ids in generate_with_transformers(model, p, s)],
        "continuous batching per batch (finished images leave)":
            lambda: [ids for p, s in batches for ids in generate(model, p, encoder_hidden_states=s)],
        f"continuous batching, all images, {size} in flight (refilled)":
            lambda: generate(model, prompts, encoder_hidden_states=states, max_in_flight=size),
    }
    generate(model, prompts[:2], encoder_hidden_states=states[:2])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            outputs[name] = run()
            seconds[name].append(time.perf_counter() - start)
    baseline = next(iter(variants))
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    result = {
        "benchmark": "continuous_batching", "model": "mini", "images": len(prompts), "batch_size": size,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "load_average": [round(load, 2),
                                                                                        round(os.getloadavg()[0], 2)],
        "caption_tokens": dict(sorted(Counter(map(len, outputs[baseline])).items())),
        "rows": [{"variant": name, "median_seconds": round(medians[name], 3), "seconds": [round(s, 3) for s in times],
                  "speedup_vs_transformers_generate": round(medians[baseline] / medians[name], 2),
                  "identical_to_transformers_generate": sum(a == b for a, b in zip(outputs[name], outputs[baseline]))
                  / len(prompts)}
                 for name, times in seconds.items()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
