"""Where the exact batched captioning time goes: image preprocessing, vision encoder, the prompt prefill, and each
part of the continuous-batching decoding step (`smallcap.beam_batching`).

Same model and inputs as `caption_throughput.py` (real-size architecture, random weights, '.' row boosted, k=4 real
COCO captions, beam 3, 25 new tokens), one batch of 16 after a warm-up batch. Two passes over the same batch:

1. wall clock per part: the `_Slots` methods (prefill, decoding step, beam selection, batch shrink)
   are wrapped with timers, and forward hooks on the decoder's modules split the prefill and the step into
   embeddings, layer norms, attention projections, MLP and LM head. What a step spends outside those modules is
   its attention products, cache writes and Python; the beam selection is its log-softmax, top-k, beam histories
   and finished-hypothesis bookkeeping.
2. the torch profiler's per-operator table for the decoding (prefill and steps; no hooks): self time and calls of
   the costliest operators, and the number of operator calls per step (kernel launches on a GPU).

Also counts the padding: prompt positions of the prefill that are left padding, and decode steps a row runs after its
chosen caption has ended.

    python benchmarks/caption_profile.py [--images 16] [--dot-boost 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import CLIPImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caption_throughput import REPO, SHARED, build_model, inputs  # noqa: E402

from smallcap import beam_batching  # noqa: E402
from smallcap.captioner import Captioner  # noqa: E402
from smallcap.generation import GenerationSettings, generate  # noqa: E402
from smallcap.prompt import load_tokenizer, prompt_ids  # noqa: E402


class PartTimer:
    """Wall time per named part. `phase` is the `_Slots` method running (prefill, step, ...); module hooks add
    their module's time to "<phase>: <part>"; `timed_method` wraps a `_Slots` method and adds its time, less the
    time of hooked modules and nested methods inside it, to "<phase>: other"."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.phase = "outside"
        self._inner = [0.0]  # time spent in timed parts nested in the current one
        self._depth = 0  # hooked modules running
        self.handles = []

    def watch(self, module: torch.nn.Module, part: str) -> None:
        start: list[float] = []

        def before(mod, args):
            self._depth += 1
            start.append(time.perf_counter())

        def after(mod, args, output):
            seconds = time.perf_counter() - start.pop()
            self._depth -= 1
            if self._depth == 0:  # a hooked module inside another (a projection in the prefill) counts in the outer
                self.seconds[f"{self.phase}: {part}"] += seconds
                self._inner[-1] += seconds

        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    @contextmanager
    def method(self, phase: str):
        outer_phase, self.phase = self.phase, phase
        self._inner.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.seconds[f"{phase}: other"] += seconds - self._inner.pop()
            self._inner[-1] += seconds
            self.calls[phase] += 1
            self.phase = outer_phase

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# The `_Slots` methods timed, and the phase each one is.
METHODS = {"fill": "prefill", "forward": "step", "select": "beam selection", "keep": "batch shrink"}


@contextmanager
def timed_slots(timer: PartTimer):
    """Wrap `_Slots`' methods with the timer while inside, and watch the LM head they are given."""
    originals = {name: getattr(beam_batching._Slots, name) for name in METHODS}
    pack = beam_batching.packed_lm_head

    def pack_and_watch(lm_head, rows):
        head = pack(lm_head, rows)
        if head is not lm_head:
            timer.watch(head, "LM head")
        return head

    def wrapped(name, original):
        def method(self, *args, **kwargs):
            with timer.method(METHODS[name]):
                return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(beam_batching._Slots, name, wrapped(name, original))
    beam_batching.packed_lm_head = pack_and_watch
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(beam_batching._Slots, name, original)
        beam_batching.packed_lm_head = pack


def watch_decoder(timer: PartTimer, decoder) -> None:
    """Hooks on every decoder part the prefill and the step call as modules."""
    t = decoder.transformer
    timer.watch(t.wte, "embeddings")
    timer.watch(t.wpe, "embeddings")
    timer.watch(t.ln_f, "layer norms")
    timer.watch(decoder.lm_head, "LM head")
    for block in t.h:
        for norm in (block.ln_1, block.ln_cross_attn, block.ln_2):
            timer.watch(norm, "layer norms")
        timer.watch(block.mlp, "MLP")
        # The prefill calls the attention modules (their projections nest inside and count there); the step calls
        # only the projections.
        timer.watch(block.attn, "self-attention")
        timer.watch(block.crossattention, "cross-attention")
        timer.watch(block.attn.c_attn, "self-attention projections")
        timer.watch(block.attn.c_proj, "self-attention projections")
        timer.watch(block.crossattention.q_attn, "cross-attention projections")
        timer.watch(block.crossattention.c_proj, "cross-attention projections")


def profile_parts(captioner: Captioner, images, prompts) -> tuple[dict[str, float], float, list[list[int]]]:
    """Pass 1: wall seconds per part for captioning `images` with `prompts`; returns (parts, total, new ids)."""
    model = captioner.model
    timer = PartTimer()
    watch_decoder(timer, model.decoder)
    start = time.perf_counter()
    pixels = captioner.pixel_values(images)
    preprocessed = time.perf_counter()
    with torch.inference_mode():
        states = model.encoder(pixel_values=pixels).last_hidden_state
    encoded = time.perf_counter()
    with timed_slots(timer):
        new_ids = generate(model, prompts, encoder_hidden_states=states, settings=captioner.settings)
    done = time.perf_counter()
    timer.remove()
    parts = {"image preprocessing (CLIP processor)": preprocessed - start, "vision encoder": encoded - preprocessed}
    order = ["prefill", "step", "beam selection", "batch shrink"]
    parts.update(sorted(timer.seconds.items(), key=lambda kv: (order.index(kv[0].split(":")[0]), kv[0])))
    parts["decoding loop outside the slot methods (Python, result collection)"] = (
        (done - encoded) - sum(timer.seconds.values()))
    rename = {"step: other": "step: other (attention products, cache writes, Python)",
              "beam selection: other": "beam selection: other (log-softmax, top-k, beam histories, finished hypotheses)",
              "prefill: other": "prefill: other (padding, cache copy into the slots)"}
    parts = {rename.get(name, name): seconds for name, seconds in parts.items()}
    parts["steps (calls)"] = timer.calls["step"]
    return parts, done - start, new_ids


def profile_operators(captioner: Captioner, states: torch.Tensor, prompts, steps: int, top: int = 20) -> dict:
    """Pass 2: the torch profiler's per-operator self time for the decoding of the batch (no hooks)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(captioner.model, prompts, encoder_hidden_states=states, settings=captioner.settings)
    events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::"))]
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    calls = sum(e.count for e in events)
    return {"operator_self_seconds": round(total / 1e6, 2), "operator_calls": calls,
            "operator_calls_per_step": round(calls / steps),
            "top_operators": [{"operator": e.key, "self_seconds": round(e.self_cpu_time_total / 1e6, 3),
                               "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in rows]}


def main(argv: list[str] | None = None) -> dict:
    """Profile one batch; write JSON and Markdown and print the table."""
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
    prompts = [prompt_ids(tokenizer, caps, captioner.k) for caps in retrieved]
    load = os.getloadavg()[0]
    parts, total, new_ids = profile_parts(captioner, images, prompts)
    steps = parts.pop("steps (calls)")
    states = captioner.encode(images)
    operators = profile_operators(captioner, states, prompts, steps)
    longest = max(map(len, new_ids))
    # the prefill's groups (`beam_batching._Slots.fill`): prompts sorted by length, each group padded to its longest
    lengths = sorted(map(len, prompts))
    group = beam_batching._PREFILL_GROUP
    padded = sum(max(lengths[i:i + group]) * len(lengths[i:i + group]) for i in range(0, len(lengths), group))
    result = {
        "benchmark": "caption_profile", "path": "continuous batching (smallcap.beam_batching), float32",
        "images": len(images), "dot_boost": args.dot_boost, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average": round(load, 2), "total_seconds": round(total, 2),
        "decode_steps": steps,
        "parts": {name: {"seconds": round(s, 3), "share": round(s / total, 3)} for name, s in parts.items()},
        "prompt_padding_share": round(1 - sum(lengths) / padded, 3),
        "steps_beyond_each_rows_caption_share": round(1 - sum(map(len, new_ids)) / (longest * len(new_ids)), 3),
        "caption_tokens": sorted(map(len, new_ids)),
        **operators,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The profile as Markdown: parts, then operators."""
    lines = [f"# caption_profile: {result['path']}", "",
             f"{result['images']} images, '.' row ×{result['dot_boost']:g}, {result['threads']} threads, torch "
             f"{result['torch']}, load average {result['load_average']}; {result['total_seconds']} s in all, "
             f"{result['decode_steps']} decoding steps; {result['prompt_padding_share']:.0%} of prompt positions are "
             f"left padding; caption tokens {result['caption_tokens']}.", "",
             "| part | seconds | share |", "|---|--:|--:|"]
    lines += [f"| {name} | {part['seconds']:.2f} | {part['share']:.1%} |" for name, part in result["parts"].items()]
    lines += ["", f"Operators (torch profiler, decoding only, second pass without hooks): {result['operator_calls']} "
              f"calls ({result['operator_calls_per_step']} per step), {result['operator_self_seconds']} s of "
              "operator self time.", "", "| operator | self seconds | share | calls |", "|---|--:|--:|--:|"]
    lines += [f"| {op['operator']} | {op['self_seconds']:.3f} | {op['share']:.1%} | {op['calls']} |"
              for op in result["top_operators"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
