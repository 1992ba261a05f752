"""Video input overlapped with captioning: the Captioner reads and tiles the next batch's clips in a background
thread while the current batch decodes text (`Captioner(prefetch=True)`, the default) versus one after the other.

Generates H.264 clips that pan over real COCO photos (`video_decode.generate_clip`), then captions them in
batches with both settings, interleaved, in this one process; also times decoding+tiling alone and captioning the
already-tiled images alone, so that "overlapped" can be compared with their sum (serial) and their maximum (the
best overlap can do). Captions must be equal in all runs.

    python benchmarks/video_overlap.py [--model mini|real-size] [--clips 8] [--batch-size 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from video_decode import REPO, generate_clip  # noqa: E402

from smallcap.captioner import Captioner  # noqa: E402
from smallcap.images import load_image  # noqa: E402


def real_size_captioner() -> Captioner:
    """The throughput benchmark's random-weight real-size model ('.' row x4), without retrieval."""
    from transformers import CLIPImageProcessor

    from caption_throughput import SHARED, build_model
    from smallcap.prompt import load_tokenizer

    return Captioner(build_model(4.0), load_tokenizer(str(SHARED / "data/tokenizers/gpt2")), CLIPImageProcessor(),
                     use_retrieval=False)


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; writes benchmarks/results/video_overlap[_MODEL].json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mini", help="mini (bundled) or real-size (random weights)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--seconds", type=int, default=12, help="clip length (a multiple of 4)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the loader thread is one more)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    captioner = (real_size_captioner() if args.model == "real-size"
                 else Captioner.from_pretrained(args.model, use_retrieval=False))
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "clip0.mp4"
        generate_clip(first, args.width, args.height, args.seconds)
        clips = [first]
        for i in range(1, args.clips):  # copies: each is read and decoded again, as a distinct file would be
            clips.append(Path(tmp) / f"clip{i}.mp4")
            clips[-1].write_bytes(first.read_bytes())
        captioner(clips[:1])  # warm-up
        times: dict[str, list[float]] = {"decode and tile only": [], "caption pre-tiled images only": [],
                                         "serial (prefetch off)": [], "overlapped (prefetch on)": []}
        captions = []
        for _ in range(args.reps):
            start = time.perf_counter()
            tiles = [load_image(clip, captioner.video) for clip in clips]
            times["decode and tile only"].append(time.perf_counter() - start)
            start = time.perf_counter()
            captions.append([r.caption for r in captioner(tiles, batch_size=args.batch_size)])
            times["caption pre-tiled images only"].append(time.perf_counter() - start)
            for name, prefetch in (("serial (prefetch off)", False), ("overlapped (prefetch on)", True)):
                captioner.prefetch = prefetch
                start = time.perf_counter()
                captions.append([r.caption for r in captioner(clips, batch_size=args.batch_size)])
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    decode, caption = median["decode and tile only"], median["caption pre-tiled images only"]
    result = {
        "benchmark": "video_overlap", "model": args.model, "clips": args.clips, "batch_size": args.batch_size,
        "clip": f"{args.width}x{args.height}, {args.seconds} s, 30 fps, H.264 (copies of one clip)",
        "threads": args.threads, "cpu_count": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
        "median_seconds": {name: round(value, 2) for name, value in median.items()},
        "all_seconds": {name: [round(v, 2) for v in values] for name, values in times.items()},
        "video_cost_on_top_of_captioning": {
            "serial": round(median["serial (prefetch off)"] / caption - 1, 3),
            "overlapped": round(median["overlapped (prefetch on)"] / caption - 1, 3),
            "decode_alone_over_caption_alone": round(decode / caption, 3)},
        "captions_equal_in_all_runs": all(c == captions[0] for c in captions),
    }
    out = args.out or REPO / f"benchmarks/results/video_overlap{'' if args.model == 'mini' else '_' + args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
