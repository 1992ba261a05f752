"""Where a batch's captioning time goes: image preprocessing, vision encoder, prompt prefill, per-step decoder parts
(self-attention, cross-attention, MLP, LM head) and the rest of beam search (bookkeeping, cache reordering).

Same model and inputs as `caption_throughput.py` (real-size architecture, random weights, '.' row boosted, k=4 real
COCO captions, beam 3, 25 new tokens); wall-clock time per part measured with forward hooks on one batch, after a
warm-up batch. `generate` decodes with continuous batching (`smallcap.beam_batching`), whose steps call the
attention projections but not the attention modules: their attention products count in the rest; the prefill runs
through the modules. Also counts the padding: prompt tokens that are left padding, and decode steps a row runs after its
chosen caption has ended (an upper bound on the waste of running the batch to its longest row).

    python benchmarks/caption_profile.py [--images 16] [--dot-boost 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import CLIPImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_throughput import REPO, SHARED, build_model, inputs  # noqa: E402

from smallcap.captioner import Captioner  # noqa: E402
from smallcap.generation import GenerationSettings, generate  # noqa: E402
from smallcap.prompt import load_tokenizer, prompt_ids  # noqa: E402


class PartTimer:
    """Forward hooks that add each module's wall time to a named part, split into prefill (>1 position) and step."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        self.handles = []

    def watch(self, module: torch.nn.Module, part: str) -> None:
        def before(mod, args, kwargs):
            self._start[id(mod)] = time.perf_counter()

        def after(mod, args, kwargs, output):
            hidden = args[0] if args else next(iter(kwargs.values()))
            phase = "prefill" if hidden.shape[1] > 1 else "step"
            self.seconds[f"{phase}: {part}"] += time.perf_counter() - self._start.pop(id(mod))

        self.handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                         module.register_forward_hook(after, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main(argv: list[str] | None = None) -> dict:
    """Profile one batch; write JSON and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--dot-boost", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/caption_profile.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(SHARED / "data/tokenizers/gpt2"))
    captioner = Captioner(build_model(args.dot_boost), tokenizer, CLIPImageProcessor(), settings=GenerationSettings())
    images, retrieved = inputs(args.images)
    captioner(images[:2], retrieved=retrieved[:2])  # warm-up
    model = captioner.model
    timer = PartTimer()
    for block in model.decoder.transformer.h:
        timer.watch(block.attn, "self-attention")
        timer.watch(block.crossattention, "cross-attention")
        timer.watch(block.mlp, "MLP")
    timer.watch(model.decoder.lm_head, "LM head")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    pixels = captioner.pixel_values(images)
    preprocessed = time.perf_counter()
    with torch.inference_mode():
        states = model.encoder(pixel_values=pixels).last_hidden_state
    encoded = time.perf_counter()
    prompts = [prompt_ids(tokenizer, caps, captioner.k) for caps in retrieved]
    new_ids = generate(model, prompts, encoder_hidden_states=states, settings=captioner.settings)
    done = time.perf_counter()
    timer.remove()
    parts = {"image preprocessing (CLIP processor)": preprocessed - start, "vision encoder": encoded - preprocessed}
    parts.update(sorted(timer.seconds.items()))
    parts["rest (embeddings, layer norms, beam bookkeeping, cache reorder, the steps' attention products)"] = (
        (done - encoded) - sum(timer.seconds.values()))
    total = done - start
    width = max(map(len, prompts))
    steps = max(map(len, new_ids))
    result = {
        "benchmark": "caption_profile", "images": len(images), "dot_boost": args.dot_boost,
        "threads": torch.get_num_threads(), "load_average": round(load, 2), "total_seconds": round(total, 2),
        "parts": {name: {"seconds": round(s, 3), "share": round(s / total, 3)} for name, s in parts.items()},
        "prompt_padding_share": round(1 - sum(map(len, prompts)) / (width * len(prompts)), 3),
        "decode_steps": steps,
        "steps_beyond_each_rows_caption_share": round(1 - sum(map(len, new_ids)) / (steps * len(new_ids)), 3),
        "caption_tokens": sorted(map(len, new_ids)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, part in result["parts"].items():
        print(f"{part['share']:6.1%} {part['seconds']:8.2f} s  {name}")
    print({k: v for k, v in result.items() if k != "parts"})
    return result


if __name__ == "__main__":
    main()
