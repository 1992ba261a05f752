"""The paper's two ablations in the miniature world, through the public commands: the number of retrieved captions
k (1, 2, 4, 8) and the cross-attention reduce factor r (1, 2, 4, 8, 16: trainable parameters against CIDEr).

    python benchmarks/miniworld_ablations.py --work DIR [--out benchmarks/results/miniworld_ablations.json]

DIR is a finished `benchmarks/miniworld.py --work DIR` run (one seed). Its world, datastores and feature cache are
reused; each variant is its recipe with k or r changed, trained with `smallcap train` on the source domain with
retrieval from the run's source datastore (its retrieval encoder: the learned retriever when the world has one), and
scored on the source test images with `smallcap predict --datastore` and `smallcap evaluate`. The run's own model
(k=4, r=4) is the shared point of both sweeps.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads otherwise spin on a shared machine

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from miniworld_experiment import (METRICS, TrainingRecipe, build_datastores, caption_statistics, cli,  # noqa: E402
                                  environment, karpathy_file, train_model, write_results)

RESULTS = Path(__file__).resolve().parent / "results"
KS = (1, 2, 4, 8)
REDUCE_FACTORS = (1, 2, 4, 8, 16)


def variants(base: TrainingRecipe) -> dict[str, TrainingRecipe]:
    """Every recipe of both sweeps, named; the base recipe is the run's own "rag" model."""
    out = {"rag": base}
    out.update({f"k{k}": replace(base, k=k) for k in KS if k != base.k})
    out.update({f"r{r}": replace(base, reduce_factor=r) for r in REDUCE_FACTORS if r != base.reduce_factor})
    return out


def trainable_parameters(checkpoint: Path) -> int:
    """The checkpoint's cross-attention parameters: what `smallcap train` trains."""
    from smallcap.captioner import Captioner

    model = Captioner.from_pretrained(str(checkpoint)).model
    model.freeze_for_training()
    return model.num_trainable_parameters()


def run(work: Path) -> dict:
    """Train, predict and score every variant; returns the results of both sweeps."""
    config = json.loads((work / "experiment.json").read_text(encoding="utf-8"))
    base = TrainingRecipe(**config["training"])
    world = json.loads((work / "world" / "world.json").read_text(encoding="utf-8"))
    stores = build_datastores(work / "world", world, work / "datastores")
    data = karpathy_file(work / "world", world, "source")
    out_dir = work / "ablations"
    results = {}
    for name, recipe in variants(base).items():
        checkpoint = train_model(work / "world", world, stores, work / "training", name, recipe, config["seed"])
        preds, scores = out_dir / f"{name}.preds.json", out_dir / f"{name}.scores.json"
        if not preds.is_file():
            cli("predict", data, "--split", "test", "--model", checkpoint, "--datastore", stores["source"],
                "--out", preds, "--batch-size", 32)
        if not scores.is_file():
            cli("evaluate", "--references", data, "--split", "test", "--predictions", preds, "--out", scores,
                "--metrics", ",".join(("BLEU", "METEOR", "ROUGE-L", "CIDEr")))
        scored = json.loads(scores.read_text(encoding="utf-8"))
        captions = {row["image_id"]: row["caption"] for row in json.loads(preds.read_text(encoding="utf-8"))}
        results[name] = {"k": recipe.k, "reduce_factor": recipe.reduce_factor,
                         "trainable_parameters": trainable_parameters(checkpoint),
                         "scores": {m: scored["scores"][m] for m in METRICS},
                         "content_correct": caption_statistics(data, world, captions)["content_correct"]}
    return {"work": str(work), "seed": config["seed"], "base": config["training"],
            "retrieval_encoder": json.loads((stores["source"] / "manifest.json").read_text())["encoder"]["name"],
            "variants": results, "environment": environment()}


def markdown(results: dict) -> str:
    """A table per sweep."""
    rows = results["variants"].values()
    base = results["base"]
    lines = []
    for title, key, fixed, values in (("k (retrieved captions)", "k", "reduce_factor", KS),
                                      ("r (reduce factor)", "reduce_factor", "k", REDUCE_FACTORS)):
        lines += [f"Sweep of {title}, {fixed} = {base[fixed]} (seed {results['seed']}, source test):", "",
                  f"| {key} | trainable parameters | BLEU-4 | METEOR | ROUGE-L | CIDEr | content correct |",
                  "|--:|--:|--:|--:|--:|--:|--:|"]
        for value in values:
            row = next(r for r in rows if r[key] == value and r[fixed] == base[fixed])
            cells = " | ".join(f"{row['scores'][m]:.1f}" for m in METRICS)
            lines.append(f"| {value} | {row['trainable_parameters']:,} | {cells} | {100 * row['content_correct']:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a finished benchmarks/miniworld.py --work DIR")
    parser.add_argument("--out", type=Path, default=RESULTS / "miniworld_ablations.json")
    args = parser.parse_args(argv)
    if not (args.work / "experiment.json").is_file() or not (args.work / "world" / "world.json").is_file():
        parser.error(f"{args.work} holds no miniworld run; run benchmarks/miniworld.py --work DIR first")
    transformers_logging.set_verbosity_error()
    results = run(args.work)
    write_results(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
