"""The miniworld experiment end to end: does retrieval help, and does swapping the datastore transfer SmallCap to a
domain it was never trained on? (`benchmarks/miniworld_experiment.py` describes the pipeline and conditions.)

    python benchmarks/miniworld.py [--seed 0] [--preset default] [--work DIR] [--keep-work]
    python benchmarks/miniworld.py --preset small --seeds 0 1 2 3 4 --out benchmarks/results/miniworld_seeds.json

Every stage runs the public `smallcap` commands (in this process). Writes benchmarks/results/miniworld.json (all
scores, caption statistics, the world's pretraining metrics, per-stage timings, the machine) and
benchmarks/results/miniworld.md (the table). Seeded: a rerun with the same seed rebuilds and retrains everything
from scratch. With several --seeds, each seed is a whole new run (world, pretraining, training) and the output is
every run plus the spread of the effects over the seeds.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default; on a shared 2-core machine that made training steps several times slower.
# Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_seeds(args: argparse.Namespace) -> list[dict]:
    """One complete experiment per seed, each in its own working directory."""
    from transformers.utils import logging as transformers_logging

    from miniworld_experiment import TRAINING_PRESETS, ExperimentConfig, run_experiment

    transformers_logging.set_verbosity_error()
    work = args.work or Path(tempfile.mkdtemp(prefix="miniworld-"))
    runs = []
    try:
        for seed in args.seeds:
            training = replace(TRAINING_PRESETS[args.preset], **{name: value for name, value in (
                ("epochs", args.epochs), ("lr", args.lr)) if value is not None})
            config = ExperimentConfig(seed=seed, preset=args.preset, images_per_domain=args.images_per_domain,
                                      web_images_per_domain=args.web_images_per_domain, clip_steps=args.clip_steps,
                                      lm_steps=args.lm_steps, retriever_steps=args.retriever_steps,
                                      retriever_web_images_per_domain=args.retriever_web_images_per_domain,
                                      training=training)
            runs.append(run_experiment(work / f"seed-{seed}" if len(args.seeds) > 1 else work, config,
                                       progress=not args.quiet, jobs=args.jobs))
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return runs


def spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per effect: its value in each run, min, max, mean and standard deviation."""
    out = {}
    for name in runs[0]["effects"]:
        values = [run["effects"][name] for run in runs]
        out[name] = {"values": [round(v, 2) for v in values], "min": round(min(values), 2),
                     "max": round(max(values), 2), "mean": round(statistics.mean(values), 2),
                     "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}
    return out


def report(runs: list[dict]) -> tuple[dict, str]:
    """The JSON results and their markdown: one run's table, or every seed's effects and their spread."""
    from miniworld_experiment import markdown_table

    machine = runs[-1]["environment"]
    where = f"{machine['cpu']}, {machine['cores']} cores, load average {machine['load_average_1m_at_end']} at the end"
    timings = "; ".join(", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in run["timings_s"].items())
                        for run in runs)
    if len(runs) == 1:
        effects = "\n".join(f"- {name}: {value:+.1f} CIDEr" for name, value in runs[0]["effects"].items())
        return runs[0], f"{markdown_table(runs[0])}\n\n{effects}\n\nTimings: {timings} ({where}).\n"
    summary = spread(runs)
    seeds = [run["config"]["seed"] for run in runs]
    lines = ["| effect (CIDEr) | " + " | ".join(f"seed {s}" for s in seeds) + " | min | mean | std |",
             "|---|" + "--:|" * (len(seeds) + 3)]
    for name, values in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:+.1f}" for v in values["values"])
                     + f" | {values['min']:+.1f} | {values['mean']:+.1f} | {values['std']:.1f} |")
    return {"runs": runs, "spread": summary}, "\n".join(lines) + f"\n\nTimings per seed: {timings} ({where}).\n"


def main(argv: list[str] | None = None) -> int:
    from smallcap.io import atomic_write_json, atomic_write_text
    from miniworld_experiment import TRAINING_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", help="several complete runs, one per seed")
    parser.add_argument("--preset", default="default", choices=sorted(TRAINING_PRESETS),
                        help="world size and recipes (smallcap.miniworld.build.PRESETS, experiment.TRAINING_PRESETS)")
    parser.add_argument("--images-per-domain", type=int, help="dataset images per domain (80/10/10 splits)")
    parser.add_argument("--web-images-per-domain", type=int, help="pretraining images per domain")
    parser.add_argument("--clip-steps", type=int, help="mini CLIP pretraining steps")
    parser.add_argument("--lm-steps", type=int, help="mini GPT-2 pretraining steps")
    parser.add_argument("--retriever-steps", type=int, help="add a separate retrieval encoder: the mini CLIP trained "
                        "this many steps further (the paper retrieves with a stronger CLIP than it encodes with)")
    parser.add_argument("--retriever-web-images-per-domain", type=int, help="the retriever's own pretraining images "
                        "per domain (a superset of the mini CLIP's; default: the same images)")
    parser.add_argument("--epochs", type=int, help="SmallCap training epochs (default: the preset's)")
    parser.add_argument("--lr", type=float, help="SmallCap training learning rate (default: the preset's)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one); finished stages "
                        "found there are reused")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary working directory")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the independent trainings (2: mini CLIP "
                        "beside mini GPT-2, SmallCap with beside without retrieval; same results, each on this "
                        "process's torch threads)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=RESULTS / "miniworld.json")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or [args.seed]
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    results, markdown = report(run_seeds(args))
    atomic_write_json(args.out, results)
    atomic_write_text(args.out.with_suffix(".md"), markdown)
    print(markdown)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
