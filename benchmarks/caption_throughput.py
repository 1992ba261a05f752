"""Captioning throughput: one image at a time (the reference's way) versus batched decoding.

Real-size architecture (CLIP ViT-B/32 vision + GPT-2 small, r=4) with random weights built from configs,
prompts of k=4 real COCO captions, beam 3, 25 new tokens, real COCO images. Every variant runs in this one
process on the same weights and inputs; captions are compared with the one-at-a-time baseline.

    python benchmarks/caption_throughput.py [--images 24] [--batch-sizes 4 8 24] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, GPT2Config

from smallcap.captioner import Captioner
from smallcap.generation import GenerationSettings
from smallcap.images import load_image
from smallcap.modeling import SmallCap, SmallCapConfig
from smallcap.prompt import clean_caption, load_tokenizer, prompt_ids

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared"))


def build_model(attn: str) -> SmallCap:
    torch.manual_seed(0)
    config = SmallCapConfig(encoder=CLIPVisionConfig(patch_size=32).to_dict(),
                            decoder={**GPT2Config().to_dict(), "model_type": "this_gpt2",
                                     "cross_attention_reduce_factor": 4})
    config._attn_implementation = attn
    model = SmallCap(config).eval()
    # Make the end token reachable, as a trained model would, so captions have realistic lengths.
    with torch.no_grad():
        model.decoder.transformer.wte.weight[13] *= 3
    return model


def inputs(n: int):
    captions = json.loads((SHARED / "data/coco/captions_val2017.json").read_text())["annotations"]
    by_image: dict[int, list[str]] = {}
    for ann in sorted(captions, key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    paths = sorted((SHARED / "data/coco-mini/val2017").glob("*.jpg"))[:n]
    pools = list(by_image.values())
    retrieved = [pools[(i * 37) % len(pools)][:2] + pools[(i * 53 + 1) % len(pools)][:2] for i in range(n)]
    return [load_image(p) for p in paths], retrieved


def timed(captioner: Captioner, images, retrieved, batch_size: int):
    start = time.perf_counter()
    results = captioner(images, retrieved=retrieved, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return [r.caption for r in results], seconds


@torch.inference_mode()
def reference_way(captioner: Captioner, images, retrieved):
    """What the reference code does: one image at a time, plain `generate` on pixels and the prompt (beam search
    runs the prompt once per beam and computes logits at every prompt position)."""
    start = time.perf_counter()
    captions = []
    for image, caps in zip(images, retrieved):
        prompt = torch.tensor([prompt_ids(captioner.tokenizer, caps, captioner.k)])
        output = captioner.model.generate(pixel_values=captioner.pixel_values([image]), decoder_input_ids=prompt,
                                          pad_token_id=0, eos_token_id=13, **captioner.settings.generate_kwargs())
        captions.append(clean_caption(captioner.tokenizer, output[0, prompt.shape[1]:].tolist()))
    return captions, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 24])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/caption_throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(str(SHARED / "data/tokenizers/gpt2"))
    processor = CLIPImageProcessor()  # CLIP's defaults: 224 shortest side, centre crop, CLIP mean/std
    images, retrieved = inputs(args.images)
    rows = []

    def record(name, attn, batch_size, dtype, captions, seconds, baseline):
        agree = sum(a == b for a, b in zip(captions, baseline)) / len(baseline)
        rows.append({"variant": name, "attention": attn, "batch_size": batch_size, "dtype": dtype,
                     "seconds": round(seconds, 2), "images_per_second": round(len(images) / seconds, 3),
                     "speedup_vs_one_at_a_time": round(base_seconds / seconds, 2), "caption_agreement": agree})
        print(json.dumps(rows[-1]), flush=True)

    model = build_model("sdpa")
    captioner = Captioner(model, tokenizer, processor, settings=GenerationSettings())
    timed(captioner, images[:2], retrieved[:2], 2)  # warm-up
    baseline, base_seconds = reference_way(captioner, images, retrieved)
    record("one image at a time, plain generate (the reference's way)", "sdpa", 1, "float32", baseline,
           base_seconds, baseline)
    for batch_size in [1] + args.batch_sizes:
        captions, seconds = timed(captioner, images, retrieved, batch_size)
        record("smallcap (prompt cache shared by beams)", "sdpa", batch_size, "float32", captions, seconds, baseline)
    best = max(args.batch_sizes)

    eager = Captioner(build_model("eager"), tokenizer, processor)
    captions, seconds = timed(eager, images, retrieved, best)
    record("smallcap, eager attention", "eager", best, "float32", captions, seconds, baseline)

    bf16 = Captioner(build_model("sdpa").to(torch.bfloat16), tokenizer, processor)
    captions, seconds = timed(bf16, images, retrieved, best)
    record("smallcap, bfloat16 weights", "sdpa", best, "bfloat16", captions, seconds, baseline)

    result = {
        "benchmark": "caption_throughput",
        "setup": {"architecture": "CLIP ViT-B/32 vision + GPT-2 small, r=4, random weights", "images": len(images),
                  "prompt": "k=4 real COCO val2017 captions", "num_beams": 3, "max_new_tokens": 25,
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()
                  or platform.machine(), "python": sys.version.split()[0]},
        "rows": rows,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
