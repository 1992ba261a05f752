"""Datastore kinds in the miniature world (the paper's section 5.2 comparison), through the public commands.

    python benchmarks/miniworld_datastores.py --work DIR [--out benchmarks/results/miniworld_datastores.json]

DIR is a finished `benchmarks/miniworld.py --work DIR` run (one seed): its world, its source- and target-domain
datastores and its SmallCap model trained with retrieval on the source domain are reused. Two more corpora are
written for the world (`smallcap.miniworld.corpora`): a large noisy *web* corpus (one alt-text-like caption per
image, partly vague, wrong or unrelated, both domains) and a small clean *human-labelled* one (five careful captions
per image, few images, both domains). Each is built into a datastore with `smallcap datastore build` and the same
retrieval encoder as the run's datastores; the model is then run with `smallcap predict` on the target domain's test
images with each datastore and combination, and scored with `smallcap evaluate`:

    source | target | web | human | target+web | target+human | target+web+human | web+human

The model never saw a target-domain caption in training, so every target-domain word it writes comes from the
datastore. The paper's pattern (Table 4 and section 5.2): the in-domain store is the best single store; adding web
or human captions to it helps a little; web and human together add little over one of them; without in-domain
captions (web+human, "domain-agnostic"), the larger web store helps more.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads otherwise spin on a shared machine

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from miniworld_experiment import (METRICS, FinishedRun, caption_statistics, cli, environment,  # noqa: E402
                                  finished_run, karpathy_file, write_results)

from smallcap.errors import SmallCapError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Corpus sizes per domain, as multiples of the world's dataset images per domain: the web store is larger than the
# in-domain one (10 images x 1 caption against 0.8 train images x 5 captions), the human one smaller (0.2 x 5).
WEB_IMAGES_PER_DATASET_IMAGE = 10
HUMAN_IMAGES_PER_DATASET_IMAGE = 0.2
STORES = ("source", "target", "web", "human", "target+web", "target+human", "target+web+human", "web+human")


def build_corpora(world: dict, work: Path, encoder: str) -> dict[str, Path]:
    """The web and human corpora of the world, written as JSONL and built into datastores."""
    from smallcap.miniworld.corpora import human_corpus, web_corpus, write_jsonl

    per_domain = sum(world["domains"]["source"]["images"].values())
    corpora = {"web": web_corpus(world["seed"], WEB_IMAGES_PER_DATASET_IMAGE * per_domain),
               "human": human_corpus(world["seed"], round(HUMAN_IMAGES_PER_DATASET_IMAGE * per_domain))}
    stores = {}
    for name, records in corpora.items():
        stores[name] = work / "datastores" / name
        if not (stores[name] / "manifest.json").is_file():
            path = write_jsonl(records, work / "corpora" / f"{name}.jsonl")
            cli("datastore", "build", path, "--out", stores[name], "--overwrite", "--encoder", encoder,
                "--tokenizer", work / "world" / world["models"]["gpt2"], "--id-column", "image_id")
    return stores


def corpus_summary(work: Path) -> dict:
    """Caption counts per corpus and, for the web one, per kind (right / vague / wrong / unrelated)."""
    summary = {}
    for name in ("web", "human"):
        rows = [json.loads(line) for line in (work / "corpora" / f"{name}.jsonl").read_text().splitlines()]
        summary[name] = {"captions": len(rows)}
        if name == "web":
            kinds = [row["kind"] for row in rows]
            summary[name]["kinds"] = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
    return summary


def run(finished: FinishedRun, domain: str = "target") -> dict:
    """Predict and score the test images of `domain` with every datastore combination; returns the results."""
    work = finished.work_dir
    world, stores, model = finished.world, dict(finished.datastores), finished.models["rag"]
    encoder = json.loads((stores["source"] / "manifest.json").read_text())["encoder"]["name"]
    stores.update(build_corpora(world, work, encoder))
    data = karpathy_file(work / "world", world, domain)
    out_dir = work / "datastore_kinds"
    results = {}
    for combination in STORES:
        slug = f"{domain}_{combination.replace('+', '-')}"
        preds, scores = out_dir / f"{slug}.preds.json", out_dir / f"{slug}.scores.json"
        if not preds.is_file():
            cli("predict", data, "--split", "test", "--model", model, "--out", preds, "--batch-size", 32,
                *[arg for name in combination.split("+") for arg in ("--datastore", stores[name])])
        if not scores.is_file():
            cli("evaluate", "--references", data, "--split", "test", "--predictions", preds, "--out", scores,
                "--metrics", ",".join(("BLEU", "METEOR", "ROUGE-L", "CIDEr")))
        scored = json.loads(scores.read_text(encoding="utf-8"))
        captions = {row["image_id"]: row["caption"] for row in json.loads(preds.read_text(encoding="utf-8"))}
        results[combination] = {"images": scored["num_images"], "scores": {m: scored["scores"][m] for m in METRICS},
                                **caption_statistics(data, world, captions)}
    return {"work": str(work), "seed": world["seed"], "domain": domain, "model": str(model),
            "datastore_encoder": encoder, "corpora": corpus_summary(work), "conditions": results,
            "environment": environment()}


def markdown(results: dict) -> str:
    """One row per datastore combination."""
    lines = [f"Test domain: {results['domain']} (seed {results['seed']}); corpora: "
             + ", ".join(f"{name} {info['captions']} captions" for name, info in results["corpora"].items()),
             "", "| datastore | BLEU-4 | METEOR | ROUGE-L | CIDEr | captions with target-only words | content correct |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for name, result in results["conditions"].items():
        cells = " | ".join(f"{result['scores'][m]:.1f}" for m in METRICS)
        lines.append(f"| {name} | {cells} | {100 * result['target_word_captions']:.0f}% "
                     f"| {100 * result['content_correct']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as transformers_logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a finished benchmarks/miniworld.py --work DIR")
    parser.add_argument("--domain", default="target", choices=["source", "target"], help="test domain")
    parser.add_argument("--out", type=Path, default=RESULTS / "miniworld_datastores.json")
    args = parser.parse_args(argv)
    try:
        finished = finished_run(args.work)  # refused before any work when it is not a finished run
    except SmallCapError as error:
        parser.error(str(error))
    transformers_logging.set_verbosity_error()
    results = run(finished, args.domain)
    write_results(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
