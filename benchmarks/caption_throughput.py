"""Captioning throughput: one image at a time (the reference's way) versus smallcap's exact and fast modes.

Real-size architecture (CLIP ViT-B/32 vision + GPT-2 small, r=4) with random weights built from configs, prompts
of k=4 real COCO captions, beam 3, 25 new tokens, real COCO images. A random-weight model rarely ends a caption, so
the end token's ('.') embedding row is multiplied by a boost: x3 is the in-repo baseline this project has always
measured, x4 imitates the issue's trained reference checkpoint ('.' row x4, realistic caption lengths). For each
boost, every variant runs in this one process on the same weights and inputs: the reference loop, smallcap exact
(float32) at each batch size, batch sorted by prompt length, reduced precision (bfloat16; float16 on GPU; logits in
float32 as `--dtype` does, and with --compare-logits-precision also all in reduced precision) and int8 dynamic
quantization (CPU), and the earlier exact path (one transformers `generate` per batch, run to its longest caption)
next to the continuous-batching beam search that replaced it. Each row gives its throughput ratio to the reference
loop and its exact-caption
agreement with it (and with exact batched smallcap, for images beyond the reference loop's share).

    python benchmarks/caption_throughput.py [--images 16] [--batch-sizes 1 8 16] [--threads 2]
    python benchmarks/caption_throughput.py --device cuda --images 2048 --reference-images 32 \\
        --batch-sizes 64 256 1024 --dtypes float16 bfloat16 --out benchmarks/results/caption_throughput_gpu.json

`--tiny` swaps in a tiny random architecture (for testing this script end to end in seconds).
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
from smallcap.generation import GenerationSettings, generate_with_transformers
from smallcap.images import load_image
from smallcap.modeling import END_TOKEN_ID, SmallCap, SmallCapConfig
from smallcap.precision import apply_precision, check_precision, quantize_decoder_int8
from smallcap.prompt import clean_caption, load_tokenizer, prompt_ids

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared"))
TINY = {"encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "decoder": dict(n_embd=64, n_layer=2, n_head=4)}


def build_model(dot_boost: float, tiny: bool = False, attn: str = "sdpa") -> SmallCap:
    """The benchmark's random-weight SmallCap (same seed, same weights every call), '.' row times `dot_boost`."""
    torch.manual_seed(0)
    encoder = CLIPVisionConfig(patch_size=32, **(TINY["encoder"] if tiny else {}))
    decoder = GPT2Config(**(TINY["decoder"] if tiny else {}))
    config = SmallCapConfig(encoder=encoder.to_dict(),
                            decoder={**decoder.to_dict(), "model_type": "this_gpt2",
                                     "cross_attention_reduce_factor": 4})
    config._attn_implementation = attn
    model = SmallCap(config).eval()
    with torch.no_grad():  # make the end token reachable, as in a trained model, so captions end
        model.decoder.transformer.wte.weight[END_TOKEN_ID] *= dot_boost
    return model


def inputs(n: int):
    """`n` real COCO images (coco-mini, repeated if `n` is larger) and k=4 real COCO captions for each."""
    captions = json.loads((SHARED / "data/coco/captions_val2017.json").read_text())["annotations"]
    by_image: dict[int, list[str]] = {}
    for ann in sorted(captions, key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    paths = sorted((SHARED / "data/coco-mini/val2017").glob("*.jpg")) + sorted(
        (SHARED / "data/coco-mini/train2017").glob("*.jpg"))
    loaded = [load_image(p) for p in paths[:n]]
    pools = list(by_image.values())
    retrieved = [pools[(i * 37) % len(pools)][:2] + pools[(i * 53 + 1) % len(pools)][:2] for i in range(n)]
    return [loaded[i % len(loaded)] for i in range(n)], retrieved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(captioner: Captioner, images, retrieved, batch_size: int, sort_by_prompt: bool = False):
    """Captions (in input order) and seconds; with `sort_by_prompt`, batches are formed in prompt-length order."""
    order = list(range(len(images)))
    if sort_by_prompt:
        order.sort(key=lambda i: len(prompt_ids(captioner.tokenizer, retrieved[i], captioner.k)))
    synchronize(captioner.model.device)
    start = time.perf_counter()
    results = captioner([images[i] for i in order], retrieved=[retrieved[i] for i in order], batch_size=batch_size)
    synchronize(captioner.model.device)
    seconds = time.perf_counter() - start
    captions = [None] * len(images)
    for position, result in zip(order, results):
        captions[position] = result.caption
    return captions, seconds


@torch.inference_mode()
def timed_transformers_generate(captioner: Captioner, images, retrieved, batch_size: int):
    """Captions and seconds of smallcap's earlier exact path: each batch's prompts left-padded into one
    transformers `generate` call that runs to the batch's longest caption (what `generate` does for decoders
    without continuous batching), with the same preprocessing, encoder and prompts as the captioner."""
    model = captioner.model
    synchronize(model.device)
    start = time.perf_counter()
    captions = []
    for first in range(0, len(images), batch_size):
        batch = images[first:first + batch_size]
        states = captioner.encode(batch)
        prompts = [prompt_ids(captioner.tokenizer, caps, captioner.k) for caps in retrieved[first:first + batch_size]]
        new_ids = generate_with_transformers(model, prompts, states, captioner.settings)
        captions += [clean_caption(captioner.tokenizer, ids) for ids in new_ids]
    synchronize(model.device)
    return captions, time.perf_counter() - start


@torch.inference_mode()
def reference_way(captioner: Captioner, images, retrieved):
    """What the reference code does: one image at a time, plain `generate` on pixels and the prompt (beam search
    runs the prompt once per beam and computes logits at every prompt position)."""
    model = captioner.model
    synchronize(model.device)
    start = time.perf_counter()
    captions, lengths = [], []
    for image, caps in zip(images, retrieved):
        prompt = torch.tensor([prompt_ids(captioner.tokenizer, caps, captioner.k)], device=model.device)
        pixels = captioner.pixel_values([image]).to(model.device, model.dtype)
        output = model.generate(pixel_values=pixels, decoder_input_ids=prompt, pad_token_id=0, eos_token_id=13,
                                **captioner.settings.generate_kwargs())
        new = output[0, prompt.shape[1]:].tolist()
        captions.append(clean_caption(captioner.tokenizer, new))
        lengths.append(new.index(END_TOKEN_ID) + 1 if END_TOKEN_ID in new else len(new))
    synchronize(model.device)
    return captions, time.perf_counter() - start, lengths


def agreement(captions, expected) -> float:
    """Share of exactly equal captions over the positions both lists cover."""
    pairs = list(zip(captions, expected))
    return round(sum(a == b for a, b in pairs) / len(pairs), 4)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_boost(args, boost: float, tokenizer, processor, images, retrieved, device: torch.device) -> list[dict]:
    """Every variant for one '.'-row boost; returns the result rows."""
    rows: list[dict] = []
    n_ref = min(args.reference_images or len(images), len(images))

    def captioner_for(model: SmallCap) -> Captioner:
        return Captioner(model, tokenizer, processor, settings=GenerationSettings())

    def record(name, batch_size, mode, captions, seconds, n):
        rate = n / seconds
        row = {"dot_boost": boost, "variant": name, "batch_size": batch_size, "mode": mode, "images": n,
               "seconds": round(seconds, 2), "images_per_second": round(rate, 3),
               "speedup_vs_reference_loop": round(rate / ref_rate, 2),
               "identical_to_reference_loop": agreement(captions[:n_ref], reference[:n_ref]),
               "identical_to_exact_batched": agreement(captions, exact) if exact else None,
               "peak_memory_mib": peak_memory_mib(device), "load_average": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    exact: list[str] = []
    captioner = captioner_for(build_model(boost, args.tiny).to(device))
    timed(captioner, images[:2], retrieved[:2], 2)  # warm-up
    reference, ref_seconds, lengths = reference_way(captioner, images[:n_ref], retrieved[:n_ref])
    ref_rate = n_ref / ref_seconds
    record("reference loop: one image at a time, plain generate", 1, "float32", reference, ref_seconds, n_ref)
    rows[-1]["new_tokens_per_caption"] = sorted(lengths)  # end token included; 25 = ran to max_new_tokens
    for batch_size in args.batch_sizes:
        n = n_ref if batch_size == 1 and device.type == "cpu" else len(images)
        captions, seconds = timed(captioner, images[:n], retrieved[:n], batch_size)
        if n == len(images) and not exact:
            exact = captions
        record("smallcap exact", batch_size, "float32", captions, seconds, n)
    best = max(args.batch_sizes)
    if not exact:
        exact, _ = timed(captioner, images, retrieved, best)
    captions, seconds = timed_transformers_generate(captioner, images, retrieved, best)
    record("smallcap exact, earlier path: transformers generate per batch (no continuous batching)", best, "float32",
           captions, seconds, len(images))
    # Sorting can only change batches when there is more than one: measure it at the largest batch size below the
    # number of images, next to the unsorted run of that size.
    several = [size for size in args.batch_sizes if 1 < size < len(images)]
    if several:
        captions, seconds = timed(captioner, images, retrieved, max(several), sort_by_prompt=True)
        record("smallcap exact, batches sorted by prompt length", max(several), "float32", captions, seconds,
               len(images))
    del captioner
    for dtype in args.dtypes:
        variants = {f"smallcap {dtype}": True}
        if args.compare_logits_precision:
            variants[f"smallcap {dtype}, logits in {dtype} (before)"] = False
        fast = {name: captioner_for(apply_precision(build_model(boost, args.tiny), str(device), dtype,
                                                    float32_logits=float32_logits))
                for name, float32_logits in variants.items()}
        for captioner in fast.values():
            timed(captioner, images[:2], retrieved[:2], 2)
        runs: dict[str, list] = {name: [] for name in fast}
        for _ in range(args.repeats):  # variants interleaved, so a change in machine load hits them alike
            for name, captioner in fast.items():
                runs[name].append(timed(captioner, images, retrieved, best))
        for name, timings in runs.items():
            seconds = sorted(s for _, s in timings)
            record(name, best, dtype, timings[0][0], seconds[len(seconds) // 2], len(images))
            rows[-1]["seconds_each_repeat"] = [round(s, 2) for _, s in timings]
        del fast
    if "int8" in args.quantize:
        check_precision(str(device), "float32", "int8")
        fast = captioner_for(quantize_decoder_int8(build_model(boost, args.tiny)))
        timed(fast, images[:2], retrieved[:2], 2)
        captions, seconds = timed(fast, images, retrieved, best)
        record("smallcap int8 dynamic quantization (decoder linear layers)", best, "int8", captions, seconds,
               len(images))
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write its JSON and a Markdown table next to it, and return the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reference-images", type=int, default=None,
                        help="images for the (slow) reference loop and batch 1 on CPU (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--dot-boosts", type=float, nargs="+", default=[3.0, 4.0],
                        help="factors for the '.' embedding row (default: 3, the in-repo baseline, and 4)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtypes", nargs="*", default=None, choices=["bfloat16", "float16"],
                        help="reduced-precision variants (default: bfloat16 on CPU, float16 and bfloat16 on GPU)")
    parser.add_argument("--quantize", nargs="*", default=None, choices=["int8"],
                        help="quantized variants (default: int8 on CPU, none on GPU)")
    parser.add_argument("--compare-logits-precision", action="store_true",
                        help="also run each reduced-precision variant with its logits in that precision too (as "
                             "before `Float32Logits`), next to the default float32 logits")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each reduced-precision variant, interleaved; rows give the median")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="tiny random architecture (tests this script)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/caption_throughput.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    if args.dtypes is None:
        args.dtypes = ["bfloat16"] if on_cpu else ["float16", "bfloat16"]
    if args.quantize is None:
        args.quantize = ["int8"] if on_cpu else []
    for dtype in args.dtypes:
        check_precision(str(device), dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(str(SHARED / "data/tokenizers/gpt2"))
    processor = CLIPImageProcessor()  # CLIP's defaults: 224 shortest side, centre crop, CLIP mean/std
    images, retrieved = inputs(args.images)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[dict] = []
    for boost in args.dot_boosts:  # results are written after each boost, so a cut-short run keeps the finished ones
        rows += run_boost(args, boost, tokenizer, processor, images, retrieved, device)
        result = write_result(args, device, images, load_before, started, rows)
    return result


def write_result(args, device: torch.device, images, load_before, started: float, rows: list[dict]) -> dict:
    """Write the rows so far (JSON and Markdown) with the setup and the load average; returns the result."""
    on_cpu = device.type == "cpu"
    result = {
        "benchmark": "caption_throughput",
        "setup": {"architecture": ("tiny random CLIP + GPT-2" if args.tiny else
                                   "CLIP ViT-B/32 vision + GPT-2 small, r=4, random weights"),
                  "images": len(images), "reference_images": min(args.reference_images or len(images), len(images)),
                  "prompt": "k=4 real COCO val2017 captions", "num_beams": 3, "max_new_tokens": 25,
                  "device": str(device), "gpu": torch.cuda.get_device_name(device) if not on_cpu else None,
                  "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "python": sys.version.split()[0]},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return result


def markdown(result: dict) -> str:
    """The result as a Markdown table (one line per row) with the setup and load above it."""
    setup = result["setup"]
    lines = [f"# caption_throughput: {setup['architecture']}, {setup['device']}",
             "",
             f"{setup['images']} images ({setup['reference_images']} for the reference loop), beam 3, 25 new tokens, "
             f"torch {setup['torch']}, {setup['threads']} threads, {setup['cpu_count']} CPUs; load average "
             f"{result['load_average_before'][0]} before, {result['load_average_after'][0]} after; "
             f"{result['wall_seconds']} s in all.",
             "",
             "| '.' boost | variant | batch | mode | images/s | × reference loop | identical to reference loop "
             "| identical to exact batched |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        exact = "" if row["identical_to_exact_batched"] is None else f"{row['identical_to_exact_batched']:.0%}"
        lines.append(f"| ×{row['dot_boost']:g} | {row['variant']} | {row['batch_size']} | {row['mode']} | "
                     f"{row['images_per_second']} | {row['speedup_vs_reference_loop']}× | "
                     f"{row['identical_to_reference_loop']:.0%} | {exact} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
