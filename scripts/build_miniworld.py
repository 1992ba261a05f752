#!/usr/bin/env python
"""Build the miniature SmallCap world in one seeded command: images and captions of a source and a target
domain, a mini GPT-2 tokenizer, a mini CLIP and a mini GPT-2, with a report in OUT/world.json.

    python scripts/build_miniworld.py OUT [--seed 0] [--small] [--images-per-domain N] [--overwrite]
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default; on a shared 2-core machine that made training steps several times
# slower. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's package, not an installed one


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the world, print its metrics; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="a world for CI: about a minute to build")
    parser.add_argument("--images-per-domain", type=int, help="dataset images per domain (80/10/10 splits)")
    parser.add_argument("--web-images-per-domain", type=int, help="pretraining images per domain")
    parser.add_argument("--clip-steps", type=int, help="mini CLIP training steps")
    parser.add_argument("--lm-steps", type=int, help="mini GPT-2 training steps")
    parser.add_argument("--clip-tokenizer", type=Path, help="real CLIP tokenizer files to cut the mini one from "
                        "(default: $SMALLCAP_SHARED/data/tokenizers/clip)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--jobs", type=int, default=1, help="processes: 2 trains the mini GPT-2 beside the mini CLIP "
                        "(same models; each uses --threads threads)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    import torch

    from smallcap.errors import SmallCapError
    from smallcap.miniworld.build import build_world, recipe_with

    torch.set_num_threads(args.threads)
    recipe = recipe_with("small" if args.small else "default", args.images_per_domain,
                         args.web_images_per_domain, args.clip_steps, args.lm_steps)
    try:
        report = build_world(args.out, seed=args.seed, recipe=recipe, clip_tokenizer_dir=args.clip_tokenizer,
                             overwrite=args.overwrite, progress=not args.quiet, jobs=args.jobs)
    except SmallCapError as error:
        print(f"build_miniworld: error: {error}", file=sys.stderr)
        return 2
    summary = {"out": str(args.out), "retrieval": report["metrics"]["retrieval"],
               "language_model": report["metrics"]["language_model"], "timings_s": report["timings_s"]}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
