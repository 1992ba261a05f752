"""Time and peak memory of one SmallCap training step, per batch size and precision.

The real-size model (CLIP ViT-B/32 vision tower + GPT-2 small, r=4, random weights) trains from cached
features (random 50x768 encoder states), through the same accelerate path as `smallcap train`: forward,
backward, gradient clipping, AdamW step. Each (batch size, precision) runs in its own process so that its peak
memory is its own: on CPU the peak resident set size (and what the step adds to the model, optimizer state and
batch already in memory), on CUDA `torch.cuda.max_memory_allocated`.

    python benchmarks/train_step.py [--batch-sizes 8 32 64] [--precisions fp32 bf16] [--steps 1] [--device cuda]
                                    [--losses label-positions full]

`--losses` compares smallcap's loss (LM head at the label positions only) with the stock forward's (logits at
every position), each configuration run for both, one after the other, in the same invocation.

Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
SEQUENCE_LENGTH = 80  # a k=4 prompt (~65 tokens) plus a COCO caption (~13) and the end token
CAPTION_TOKENS = 14


def build_model():
    """The real-size SmallCap (random weights), frozen but for the cross-attention."""
    from transformers import CLIPVisionConfig, GPT2Config

    from smallcap.modeling import SmallCap, SmallCapConfig, SmallCapDecoderConfig

    decoder = {k: v for k, v in GPT2Config().to_dict().items() if k not in ("model_type", "architectures")}
    config = SmallCapConfig(encoder=CLIPVisionConfig().to_dict(),
                            decoder=SmallCapDecoderConfig(**decoder, cross_attention_reduce_factor=4,
                                                          encoder_hidden_size=768).to_dict())
    return SmallCap(config)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def measure(batch_size: int, precision: str, steps: int, device: str, loss_kind: str) -> dict:
    """Warm up with a batch of 2, then time `steps` steps; returns seconds per step and peak memory."""
    import torch
    from accelerate import Accelerator

    from smallcap.training import training_loss

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision))
    model = build_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def make_batch(size: int) -> dict:
        labels = torch.full((size, SEQUENCE_LENGTH), -100)
        labels[:, -CAPTION_TOKENS:] = torch.randint(0, 50257, (size, CAPTION_TOKENS))
        batch = {"encoder_hidden_states": torch.randn(size, 50, 768),
                 "decoder_input_ids": torch.randint(0, 50257, (size, SEQUENCE_LENGTH)), "labels": labels}
        return {key: value.to(accelerator.device) for key, value in batch.items()}

    def full_loss(batch):
        from transformers.modeling_outputs import BaseModelOutput

        return model(encoder_outputs=BaseModelOutput(last_hidden_state=batch["encoder_hidden_states"]),
                     decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"]).loss

    def step(batch):
        loss = training_loss(model, batch) if loss_kind == "label-positions" else full_loss(batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    cuda = accelerator.device.type == "cuda"
    step(make_batch(2))  # warm-up on a small batch: kernels, allocator, AdamW state
    batch = make_batch(batch_size)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"batch_size": batch_size, "precision": precision, "loss": loss_kind, "seconds_per_step": round(seconds, 3),
            "samples_per_second": round(batch_size / seconds, 2), "peak_memory_mb": round(peak),
            "before_step_mb": round(baseline), "step_adds_mb": round(peak - baseline),
            "trainable_parameters": sum(p.numel() for p in trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=1, help="timed steps after a small warm-up step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--losses", nargs="+", default=["label-positions", "full"], choices=["label-positions", "full"])
    parser.add_argument("--one", nargs=3, metavar=("BATCH", "PRECISION", "LOSS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args.steps, args.device, args.one[2])))
        return

    import torch

    rows = []
    for precision in args.precisions:
        for batch_size in args.batch_sizes:
            for loss_kind in args.losses:
                done = subprocess.run([sys.executable, __file__, "--one", str(batch_size), precision, loss_kind,
                                       "--steps", str(args.steps), "--device", args.device], capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"batch {batch_size} {precision} {loss_kind} failed:\n{done.stderr[-2000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "one SmallCap training step (forward, backward, clip, AdamW) from cached 50x768 encoder states",
        "model": "CLIP ViT-B/32 vision config + GPT-2 small config, r=4, random weights",
        "sequence_length": SEQUENCE_LENGTH, "timed_steps": args.steps, "device": args.device,
        "device_name": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "torch": torch.__version__, "results": rows}, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
