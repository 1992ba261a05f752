"""Caption quality of the fast modes on trained models: exact-caption agreement with float32 and CIDEr difference.

For each mode (float32, `--dtype bfloat16`, `--quantize int8`, and for comparison `--dtype bfloat16` as it was
before its logits were computed in float32) the bundled `mini` model (small-preset miniature
world, seed 0) captions the test sets below through the public commands, `smallcap predict` then `smallcap
evaluate` (run in this process via `smallcap.cli.main`, the same code the command line runs):

    miniworld source test   30 images, `--datastore mini-source` (the domain the model was trained on)
    miniworld target test   30 images, `--datastore mini-target` (training-free domain transfer)
    coco-mini val           79 real COCO images, `--datastore mini-source` (as tests/test_fast_modes.py)

The miniature world's images and reference captions are not shipped; they are regenerated deterministically from
the bundle's seed and preset (smallcap.miniworld.export) without training anything, and checked against the bundle
before use: its sample images and their captions, its datastores' captions (the world's training captions), and its
recorded retrieval metrics, recomputed with the bundled mini CLIP on the regenerated test images.

With `--experiment RUN`, the model is instead the one a `benchmarks/miniworld.py --work RUN` run trained
with retrieval (any preset, e.g. the default size), on that run's own test images: its source test split with its
source datastore, its target test split with its target datastore (results by default in
benchmarks/results/fast_modes_quality_<preset>_seed<seed>.{json,md}; float32 is checked against the run's recorded
scores of the same two conditions once it has them).

Per mode and test set: captions identical to float32's (n/N), BLEU-4, CIDEr and the CIDEr difference to float32.
torch and faiss run on one thread (fast-mode kernels, and so captions, can depend on the thread count).

    python benchmarks/fast_modes_quality.py [--work DIR] [--out benchmarks/results/fast_modes_quality.json]
    python benchmarks/fast_modes_quality.py --experiment RUN [--work DIR] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from miniworld_experiment import FinishedRun

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared"))
COCO_MINI = SHARED / "data" / "coco-mini"
BF16_LOGITS = "bfloat16, logits in bfloat16 (before)"
MODES = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"],
         BF16_LOGITS: ["--dtype", "bfloat16"]}
METRICS = ("BLEU-4", "CIDEr")
# test set -> the miniworld experiment condition that predicts it the same way in float32 (model "rag")
RECORDED_CONDITIONS = {"miniworld source test": "source/source datastore",
                       "miniworld target test": "target/target datastore"}


@contextlib.contextmanager
def precision_variant(mode: str):
    """The before-row: `--dtype bfloat16` as it was before its logits were computed in float32 (everything in
    bfloat16), for comparison only; every other mode runs the commands unchanged."""
    if mode != BF16_LOGITS:
        yield
        return
    from smallcap import precision

    with mock.patch.object(precision, "apply_precision",
                           functools.partial(precision.apply_precision, float32_logits=False)):
        yield


def cli(*args) -> None:
    """Run one `smallcap` command in this process, exactly as the command line does; fail on a non-zero exit."""
    from smallcap.cli import main
    from smallcap.errors import SmallCapError

    args = [str(arg) for arg in args]
    code = main(args)
    if code != 0:
        raise SmallCapError(f"`smallcap {' '.join(args)}` exited with {code}")


def bundle_record() -> dict:
    """The bundled model's provenance (bundle.json): seed, preset, world sizes and metrics, samples."""
    from smallcap.hub import BUNDLE_DIR

    return json.loads((BUNDLE_DIR / "bundle.json").read_text(encoding="utf-8"))


def regenerate_world(out_dir: Path) -> Path:
    """Write the bundle's miniature world (images, Karpathy files) under `out_dir` and check it is the bundle's.

    Returns `out_dir`. Raises RuntimeError naming the first check that fails.
    """
    from smallcap.hub import BUNDLE_DIR
    from smallcap.miniworld.build import PRESETS
    from smallcap.miniworld.export import sample_world, write_world

    record = bundle_record()
    seed, preset = record["config"]["seed"], record["config"]["preset"]
    per_domain = record["config"]["images_per_domain"] or PRESETS[preset].images_per_domain
    images = sample_world(seed, per_domain)
    if not (out_dir / "target" / "dataset_target.json").is_file():
        write_world(images, out_dir, seed, progress=False)
    checks = {}
    for name, captions in record["samples"].items():
        domain = name.split("_")[0]
        ours = next(image for image in images if image.domain == domain and image.filename == name)
        same_pixels = np.array_equal(np.asarray(Image.open(BUNDLE_DIR / "samples" / name).convert("RGB")),
                                     np.asarray(Image.open(out_dir / domain / "images" / name).convert("RGB")))
        if not same_pixels or ours.captions != captions or ours.split != "test":
            raise RuntimeError(f"regenerated world differs from the bundle's sample {name}")
    checks["samples"] = f"{len(record['samples'])} bundle sample images pixel-identical, captions identical"
    for domain in ("source", "target"):
        stored = (BUNDLE_DIR / "datastores" / domain / "captions.txt").read_text(encoding="utf-8").splitlines()
        train = [c for image in images if image.domain == domain and image.split == "train" for c in image.captions]
        if sorted(stored) != sorted(train):
            raise RuntimeError(f"bundled datastore {domain} does not hold the regenerated world's training captions")
        checks[f"datastore_{domain}"] = f"bundled mini-{domain} datastore = the {len(train)} regenerated training captions"
    checks["retrieval_metrics"] = recomputed_retrieval_metrics(images, seed, record)
    (out_dir / "checks.json").write_text(json.dumps(checks, indent=1))
    return out_dir


def recomputed_retrieval_metrics(images, seed: int, record: dict) -> dict:
    """The bundle's recorded retrieval metrics recomputed on the regenerated test images with the bundled CLIP."""
    from smallcap.miniworld.clip import retrieval_metrics
    from smallcap.miniworld.world import render
    from smallcap.retrieval.encoders import load_encoder

    encoder = load_encoder("mini-clip")
    recorded = record["world"]["pretraining_metrics"]["retrieval"]
    result = {}
    for domain in ("source", "target"):
        test = [i for i in images if i.domain == domain and i.split == "test"]
        store = [c for i in images if i.domain == domain and i.split == "train" for c in i.captions]
        ours = retrieval_metrics(encoder, [render(i.scene, seed) for i in test], [i.scene for i in test],
                                 [i.captions for i in test], store)
        if any(abs(ours[key] - recorded[domain][key]) > 1e-6 for key in recorded[domain]):
            raise RuntimeError(f"{domain}: retrieval metrics on the regenerated test images {ours} differ from the "
                               f"bundle's {recorded[domain]}")
        result[domain] = {key: ours[key] for key in ("recall@1", "recall@5", "content@1")}
    return result


def test_sets(world: Path) -> dict[str, dict]:
    """name -> how `predict` and `evaluate` read it: input arguments, datastore, references arguments."""
    return {
        "miniworld source test": {"data": [world / "source" / "dataset_source.json", "--split", "test"],
                                  "datastore": "mini-source",
                                  "references": [world / "source" / "dataset_source.json", "--split", "test"]},
        "miniworld target test": {"data": [world / "target" / "dataset_target.json", "--split", "test"],
                                  "datastore": "mini-target",
                                  "references": [world / "target" / "dataset_target.json", "--split", "test"]},
        "coco-mini val": {"data": [COCO_MINI / "annotations" / "captions_val2017.json",
                                   "--images-dir", COCO_MINI / "val2017"],
                          "datastore": "mini-source",
                          "references": [COCO_MINI / "annotations" / "captions_val2017.json"]},
    }


def experiment_test_sets(experiment: FinishedRun) -> dict[str, dict]:
    """The test sets of a finished miniworld experiment run, read as
    `test_sets` reads the bundle's: each domain's test split with that domain's datastore."""
    from miniworld_experiment import karpathy_file

    sets = {}
    for name, condition in RECORDED_CONDITIONS.items():
        domain = condition.split("/")[0]
        data = karpathy_file(experiment.world_dir, experiment.world, domain)
        sets[name] = {"data": [data, "--split", "test"], "datastore": experiment.datastores[domain],
                      "references": [data, "--split", "test"]}
    return sets


def run(work: Path, sets: dict[str, dict], modes: dict[str, list[str]], batch_size: int = 16,
        model: str | Path = "mini") -> dict:
    """Predict with `model` and evaluate every (test set, mode); agreement and CIDEr difference relative to
    float32."""
    results: dict[str, dict] = {}
    for name, spec in sets.items():
        slug = name.replace(" ", "-")
        captions, rows = {}, {}
        for mode, options in modes.items():
            stem = f"{slug}.{'bfloat16-bf16-logits' if mode == BF16_LOGITS else mode}"
            preds, scores = work / f"{stem}.preds.json", work / f"{stem}.scores.json"
            with precision_variant(mode):
                cli("predict", *spec["data"], "--model", model, "--datastore", spec["datastore"], *options,
                    "--batch-size", batch_size, "--out", preds, "--overwrite")
            cli("evaluate", "--references", *spec["references"], "--predictions", preds, "--out", scores,
                "--metrics", "BLEU,CIDEr")
            captions[mode] = {row["image_id"]: row["caption"] for row in json.loads(preds.read_text("utf-8"))}
            scored = json.loads(scores.read_text(encoding="utf-8"))
            rows[mode] = {"images": scored["num_images"], "scores": {m: scored["scores"][m] for m in METRICS}}
        exact = captions["float32"]
        for mode, row in rows.items():
            same = sum(captions[mode][image] == caption for image, caption in exact.items())
            row["identical_to_float32"] = f"{same}/{len(exact)}"
            row["identical_share"] = same / len(exact)
            row["cider_minus_float32"] = row["scores"]["CIDEr"] - rows["float32"]["scores"]["CIDEr"]
            row["differing"] = [{"image_id": image, "float32": caption, mode: captions[mode][image]}
                                for image, caption in exact.items() if captions[mode][image] != caption][:5]
        results[name] = rows
    return results


def float32_vs_recorded(results: dict, recorded_cider: dict[str, float], recorded_in: str) -> dict:
    """float32's CIDEr on the miniworld test sets next to the same model's recorded for the same condition
    (`recorded_cider`: condition -> CIDEr) in the experiment run `recorded_in` describes."""
    return {name: {"here": results[name]["float32"]["scores"]["CIDEr"], "recorded": recorded_cider[condition],
                   "recorded_condition": condition, "recorded_in": recorded_in}
            for name, condition in RECORDED_CONDITIONS.items()}


def recorded_float32_scores(results: dict) -> dict:
    """float32's CIDEr on the miniworld test sets next to the same model's in the recorded seed-0 small-preset run
    of the miniworld experiment (benchmarks/results/miniworld_small_seeds.json), when that file is there."""
    recorded = REPO / "benchmarks" / "results" / "miniworld_small_seeds.json"
    if not recorded.is_file():
        return {}
    run = next((r for r in json.loads(recorded.read_text(encoding="utf-8"))["runs"]
                if r["config"]["seed"] == 0 and r["config"]["preset"] == "small"), None)
    if run is None:
        return {}
    return float32_vs_recorded(results, {c: run["conditions"][c]["scores"]["CIDEr"] for c in RECORDED_CONDITIONS.values()},
                               "the recorded seed-0 small-preset experiment run")


def experiment_float32_scores(results: dict, experiment: FinishedRun) -> dict:
    """float32's CIDEr on the experiment run's test sets next to the run's own scores of the same conditions
    (its predictions/<condition>.scores.json, predicted at batch 32), when the run has evaluated them."""
    from miniworld_experiment import condition_slug

    recorded = {}
    for condition in RECORDED_CONDITIONS.values():
        scores = experiment.work_dir / "predictions" / f"{condition_slug(condition)}.scores.json"
        if not scores.is_file():
            return {}
        recorded[condition] = json.loads(scores.read_text(encoding="utf-8"))["scores"]["CIDEr"]
    return float32_vs_recorded(results, recorded, f"the run's own predictions in {experiment.work_dir}")


def totals(results: dict) -> dict[str, str]:
    """Identical captions per mode over all test sets together."""
    modes = next(iter(results.values()))
    return {mode: f"{sum(int(rows[mode]['identical_to_float32'].split('/')[0]) for rows in results.values())}/"
                  f"{sum(rows[mode]['images'] for rows in results.values())}" for mode in modes}


def markdown(result: dict) -> str:
    """One table: a row per (test set, mode); then the totals and the world checks."""
    lines = [f"# Fast modes on the trained {result['model_title']}: agreement with float32 and CIDEr difference",
             "",
             f"Model: {result['model']}. `predict` (batch {result['batch_size']}, beam 3) + `evaluate`, torch and faiss on 1 thread, "
             f"{result['environment']['cpu']}, torch {result['environment']['torch']}. CIDEr and BLEU-4 ×100.",
             "",
             "| test set | mode | images | identical to float32 | BLEU-4 | CIDEr | CIDEr − float32 |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for name, rows in result["test_sets"].items():
        for mode, row in rows.items():
            lines.append(f"| {name} | {mode} | {row['images']} | {row['identical_to_float32']} "
                         f"({row['identical_share']:.0%}) | {row['scores']['BLEU-4']:.1f} | {row['scores']['CIDEr']:.1f} "
                         f"| {row['cider_minus_float32']:+.1f} |")
    lines += ["", f"Identical to float32 over the {len(result['test_sets'])} test sets together: "
              + ", ".join(f"{mode} {count}" for mode, count in result["identical_total"].items()) + ".", ""]
    if "world_checks" in result:
        lines.append("The regenerated miniature world is the bundle's: "
                     + "; ".join(str(v) for k, v in result["world_checks"].items() if k != "retrieval_metrics")
                     + "; the bundle's recorded retrieval metrics recomputed on the regenerated test images: equal.")
    for name, scores in result["float32_vs_recorded_run"].items():
        lines.append(f"float32 CIDEr on {name}: {scores['here']:.2f} here, {scores['recorded']:.2f} in "
                     f"{scores['recorded_in']} ({scores['recorded_condition']}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed after)")
    parser.add_argument("--batch-size", type=int, default=16, help="predict's batch size (its default, 16)")
    parser.add_argument("--experiment", type=Path, help="a `benchmarks/miniworld.py --work RUN` run that has "
                        "trained its model with retrieval: measure that model on its own test splits instead of the bundled model")
    parser.add_argument("--out", type=Path, help="results JSON (markdown beside it); default "
                        "benchmarks/results/fast_modes_quality.json, with --experiment "
                        "fast_modes_quality_<preset>_seed<seed>.json")
    args = parser.parse_args(argv)
    # the benchmarks folder is on sys.path when run as a script
    from miniworld_experiment import environment, finished_run

    from smallcap.errors import SmallCapError

    experiment = None
    if args.experiment is not None:
        try:
            # refused before any work unless its datastores and retrieval-trained model are there
            experiment = finished_run(args.experiment, models=("rag",))
        except SmallCapError as error:
            parser.error(str(error))
    results_dir = REPO / "benchmarks" / "results"
    args.out = args.out or (results_dir / "fast_modes_quality.json" if experiment is None else results_dir /
                            f"fast_modes_quality_{experiment.config['preset']}_seed{experiment.config['seed']}.json")

    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fast-modes-quality-") as tmp:
        work = args.work or Path(tmp)
        if experiment is None:
            world = regenerate_world(work / "world")
            result = {"model": "mini (bundled; small-preset miniature world, seed 0)", "model_title": "`mini` model",
                      "batch_size": args.batch_size, "world_checks": json.loads((world / "checks.json").read_text()),
                      "test_sets": run(work, test_sets(world), MODES, args.batch_size)}
            result["float32_vs_recorded_run"] = recorded_float32_scores(result["test_sets"])
        else:
            config = experiment.config
            result = {"model": f"{experiment.models['rag']} (trained with retrieval on the source domain of a "
                               f"{config['preset']}-preset miniature world, seed {config['seed']}; "
                               f"{sum(experiment.world['domains']['source']['images'].values())} images per domain)",
                      "model_title": f"{config['preset']}-size miniature-world model",
                      "batch_size": args.batch_size, "experiment": str(experiment.work_dir),
                      "test_sets": run(work, experiment_test_sets(experiment), MODES, args.batch_size,
                                       model=experiment.models["rag"])}
            result["float32_vs_recorded_run"] = experiment_float32_scores(result["test_sets"], experiment)
    result["identical_total"] = totals(result["test_sets"])

    result["environment"] = environment()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
