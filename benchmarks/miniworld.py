"""The miniworld experiment end to end: does retrieval help, and does swapping the datastore transfer SmallCap to a
domain it was never trained on? (`smallcap.miniworld.experiment` describes the pipeline and conditions.)

    python benchmarks/miniworld.py [--seed 0] [--preset default] [--work DIR] [--keep-work]

Every stage runs the public `smallcap` commands (in this process). Writes benchmarks/results/miniworld.json (all
scores, caption statistics, the world's pretraining metrics, per-stage timings, the machine) and
benchmarks/results/miniworld.md (the table). Seeded: a rerun with the same seed retrains everything from scratch
and should give the same numbers up to floating-point noise.
"""

from __future__ import annotations

import os

# Idle OpenMP threads spin by default; on a shared 2-core machine that made training steps several times slower.
# Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    from smallcap.io import atomic_write_json, atomic_write_text
    from smallcap.miniworld.experiment import ExperimentConfig, TrainingRecipe, markdown_table, run_experiment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", help="world preset of smallcap.miniworld.build")
    parser.add_argument("--images-per-domain", type=int)
    parser.add_argument("--epochs", type=int, default=TrainingRecipe.epochs)
    parser.add_argument("--lr", type=float, default=TrainingRecipe.lr)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one); finished stages "
                        "found there are reused")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary working directory")
    parser.add_argument("--out", type=Path, default=RESULTS / "miniworld.json")
    args = parser.parse_args(argv)

    config = ExperimentConfig(seed=args.seed, preset=args.preset, images_per_domain=args.images_per_domain,
                              training=TrainingRecipe(epochs=args.epochs, lr=args.lr))
    work = args.work or Path(tempfile.mkdtemp(prefix="miniworld-"))
    try:
        results = run_experiment(work, config)
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    table = markdown_table(results)
    atomic_write_json(args.out, results)
    effects = "\n".join(f"- {name}: {value:+.1f} CIDEr" for name, value in results["effects"].items())
    timings = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in results["timings_s"].items())
    atomic_write_text(args.out.with_suffix(".md"), f"{table}\n\n{effects}\n\nTimings: {timings}; "
                      f"{results['environment']['cpu']}, {results['environment']['cores']} cores, load average "
                      f"{results['environment']['load_average_1m_at_end']} at the end.\n")
    print(table)
    print(effects)
    print(f"timings: {timings}", file=sys.stderr)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
