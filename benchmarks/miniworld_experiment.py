"""The miniworld experiment: SmallCap's whole pipeline on a synthetic world, through the public commands only.

An experiment harness, not library code: it drives `smallcap.cli.main` and lives beside the benchmark that runs it.

world (images, captions, mini CLIP, mini GPT-2)  ->  `smallcap datastore build` (source and target training
captions, mini CLIP as encoder)  ->  `smallcap datastore retrieve` (training retrieval: top 15, own captions
dropped, 7 kept)  ->  `smallcap train` on the SOURCE domain only, with and without retrieval  ->  `smallcap
predict` + `smallcap evaluate` on held-out test images of both domains:

    source test:  no retrieval  |  source datastore
    target test:  no retrieval  |  source datastore  |  target datastore  |  source + target datastores

The target domain's shapes and colours never occur in a source caption, so the decoder can name them only
by copying them from retrieved captions: SmallCap's training-free domain transfer (paper section 5) in
miniature. Besides the COCO metrics, each condition reports how often captions use target-only words and how
often a caption names exactly the image's shapes (and no colour it lacks), which explains the metrics.

One diagnostic condition, "source/oracle retrieval", replaces the mini CLIP retriever with a perfect one:
captions of training images whose scenes hold the same objects (read from the world's scene descriptions)
go into the prompt through `smallcap predict --retrieved`. It separates the two reasons retrieval can fail
to help: a retriever that finds the wrong captions, or a model that does not use right ones.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from smallcap.errors import SmallCapError

METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# (condition, test domain, model, datastores); model "rag" is trained with retrieval, "plain" without.
CONDITIONS = (
    ("source/no retrieval", "source", "plain", ()),
    ("source/source datastore", "source", "rag", ("source",)),
    ("source/oracle retrieval", "source", "rag", ("oracle",)),
    ("target/no retrieval", "target", "plain", ()),
    ("target/source datastore", "target", "rag", ("source",)),
    ("target/target datastore", "target", "rag", ("target",)),
    ("target/source+target datastores", "target", "rag", ("source", "target")),
)


@dataclass
class TrainingRecipe:
    """How `smallcap train` is run on the miniworld (the paper's recipe scaled to a model of 0.03-0.05M trained
    weights: a larger learning rate; epochs chosen per world size so that training runs ~1,000 optimizer steps or
    more at the default size and ~400 at the small one)."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    reduce_factor: int = 4
    k: int = 4


# Per world preset (smallcap.miniworld.build.PRESETS). The small world has a tenth of the images, so 6 epochs
# there are 114 steps, too few for the cross-attention to learn to use the image or the retrieved captions.
TRAINING_PRESETS = {"default": TrainingRecipe(), "small": TrainingRecipe(epochs=20)}


@dataclass
class ExperimentConfig:
    """Everything the experiment's numbers depend on."""

    seed: int = 0
    preset: str = "default"  # world size and pretraining preset of smallcap.miniworld.build
    images_per_domain: int | None = None
    web_images_per_domain: int | None = None
    clip_steps: int | None = None
    lm_steps: int | None = None
    retriever_steps: int | None = None  # a separate, longer-trained retrieval encoder (smallcap.miniworld.build)
    retriever_web_images_per_domain: int | None = None  # the retriever's own, larger web (default: the CLIP's)
    training: TrainingRecipe | None = None  # None: the preset's (TRAINING_PRESETS)

    def __post_init__(self) -> None:
        if self.preset not in TRAINING_PRESETS:
            raise SmallCapError(f"unknown miniworld preset {self.preset!r}; choose one of {', '.join(TRAINING_PRESETS)}")
        if self.training is None:
            self.training = replace(TRAINING_PRESETS[self.preset])


@dataclass
class FinishedRun:
    """The parts of a finished `benchmarks/miniworld.py --work DIR` run that later benchmarks reuse."""

    work_dir: Path
    config: dict  # its experiment.json
    world_dir: Path
    world: dict  # its world.json
    datastores: dict[str, Path]  # domain -> datastore of the domain's training captions
    models: dict[str, Path]  # "rag" / "plain" -> final checkpoint


def finished_run(work_dir: str | Path, models: tuple[str, ...] = ("rag", "plain")) -> FinishedRun:
    """The experiment run in `work_dir`, laid out as `run_experiment` writes it, with its datastores and the final
    checkpoints of `models` finished (its evaluation need not be); SmallCapError naming the first missing part."""
    work_dir = Path(work_dir)
    needed = [work_dir / "experiment.json", work_dir / "world" / "world.json"]
    for path in needed:
        if not path.is_file():
            raise SmallCapError(f"{work_dir} is not a finished miniworld experiment run: {path} is missing "
                                f"(run `python benchmarks/miniworld.py --work {work_dir}` first)")
    config = json.loads(needed[0].read_text(encoding="utf-8"))
    world = json.loads(needed[1].read_text(encoding="utf-8"))
    run = FinishedRun(work_dir, config, work_dir / "world", world,
                      {domain: work_dir / "datastores" / domain for domain in world["domains"]},
                      {name: work_dir / "training" / name / f"epoch-{config['training']['epochs']}"
                       for name in models})
    for path in ([store / "manifest.json" for store in run.datastores.values()]
                 + [model / "config.json" for model in run.models.values()]):
        if not path.is_file():
            raise SmallCapError(f"{work_dir} is not a finished miniworld experiment run: {path} is missing "
                                f"(rerun `python benchmarks/miniworld.py --work {work_dir}` with its configuration "
                                "to finish it)")
    return run


def condition_slug(name: str) -> str:
    """The file-name stem of a condition's predictions and scores (`predictions/<slug>.preds.json`)."""
    return name.replace("/", "_").replace(" ", "-").replace("+", "-")


def cli(*args, subprocess: bool = False) -> None:
    """Run one `smallcap` command in this process, exactly as the command line does (or, with `subprocess`, in a
    new interpreter on this process's torch thread count); fail on a non-zero exit."""
    args = [str(arg) for arg in args]
    if subprocess:
        code, detail = _cli_subprocess(args)
    else:
        from smallcap.cli import main

        code, detail = main(args), ""
    if code != 0:
        raise SmallCapError(f"`smallcap {' '.join(args)}` exited with {code}{detail}")


def _cli_subprocess(args: list[str]) -> tuple[int, str]:
    import subprocess

    import torch

    import smallcap

    package_root = str(Path(smallcap.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "smallcap", *args], env=env, capture_output=True, text=True)
    return result.returncode, (f":\n{result.stderr[-3000:]}" if result.returncode else "")


def build_world_dir(out_dir: Path, config: ExperimentConfig, progress: bool = True, jobs: int = 1) -> dict:
    """Build (or reuse, when it exists with the same seed and recipe) the world under `out_dir`."""
    from smallcap.miniworld.build import build_world, load_world_json, recipe_with

    recipe = recipe_with(config.preset, images_per_domain=config.images_per_domain,
                         web_images_per_domain=config.web_images_per_domain, clip_steps=config.clip_steps,
                         lm_steps=config.lm_steps, retriever_steps=config.retriever_steps,
                         retriever_web_images_per_domain=config.retriever_web_images_per_domain)
    if (out_dir / "world.json").is_file():
        world = load_world_json(out_dir)
        if world["seed"] == config.seed and world["recipe"] == json.loads(json.dumps(asdict(recipe))):
            return world
    return build_world(out_dir, seed=config.seed, recipe=recipe, overwrite=True, progress=progress, jobs=jobs)


def karpathy_file(world_dir: Path, world: dict, domain: str) -> Path:
    """The Karpathy split file of a domain (its images are found relative to it)."""
    return world_dir / world["domains"][domain]["karpathy"]


def retrieval_encoder(world_dir: Path, world: dict) -> Path:
    """The world's retrieval encoder: its separate retriever when it has one, else the captioning mini CLIP."""
    return world_dir / world["models"].get("retriever", world["models"]["clip"])


def build_datastores(world_dir: Path, world: dict, out_dir: Path) -> dict[str, Path]:
    """A datastore per domain from its training captions, embedded with the world's retrieval encoder."""
    stores = {}
    for domain in world["domains"]:
        stores[domain] = out_dir / domain
        if not (stores[domain] / "manifest.json").is_file():
            # raw sentences (not the reference's default, tokens): the recipe the bundle, the committed results and
            # the CI margins were all measured with
            cli("datastore", "build", karpathy_file(world_dir, world, domain), "--out", stores[domain], "--overwrite",
                "--encoder", retrieval_encoder(world_dir, world), "--tokenizer", world_dir / world["models"]["gpt2"],
                "--text", "raw")
    return stores


def train_models(world_dir: Path, world: dict, stores: dict[str, Path], out_dir: Path,
                 recipe: TrainingRecipe, seed: int, jobs: int = 1) -> dict[str, Path]:
    """Train SmallCap on the source domain's training split: with retrieval ("rag") and without ("plain").

    Both share one feature cache; training retrieval comes from the source datastore (own captions dropped).
    With `jobs` >= 2 the two trainings run side by side, each in its own process (same checkpoints: training
    seeds itself and reads the features cached first).
    """
    names = ("rag", "plain")
    if jobs < 2:
        return {name: train_model(world_dir, world, stores, out_dir, name, recipe, seed, retrieval=(name == "rag"))
                for name in names}
    features = out_dir / "features"
    if not (features / "manifest.json").is_file():
        cli("features", "extract", karpathy_file(world_dir, world, "source"), "--model",
            world_dir / world["models"]["clip"], "--out", features, "--split", "train")
    training_retrieval(world, world_dir, stores, out_dir, keep=max(7, recipe.k))
    with ThreadPoolExecutor(min(jobs, len(names))) as pool:
        runs = {name: pool.submit(train_model, world_dir, world, stores, out_dir, name, recipe, seed,
                                  retrieval=(name == "rag"), subprocess=True) for name in names}
        return {name: run.result() for name, run in runs.items()}


def training_retrieval(world: dict, world_dir: Path, stores: dict[str, Path], out_dir: Path, keep: int = 7) -> Path:
    """The source training images' retrieved captions, as the reference retrieves them: the nearest 15 captions
    of the source datastore, the image's own dropped, `keep` kept (7, or k when k is larger). Written once."""
    retrieved = out_dir / ("retrieved_train.json" if keep == 7 else f"retrieved_train_keep{keep}.json")
    if not retrieved.is_file():
        cli("datastore", "retrieve", stores["source"], "--data", karpathy_file(world_dir, world, "source"),
            "--split", "train", "--k", max(15, keep + 8), "--keep", keep, "--exclude-own", "--out", retrieved)
    return retrieved


def train_model(world_dir: Path, world: dict, stores: dict[str, Path], out_dir: Path, name: str,
                recipe: TrainingRecipe, seed: int, retrieval: bool = True, subprocess: bool = False) -> Path:
    """One `smallcap train` run on the source domain under `out_dir/name` (resumed if interrupted, reused if
    finished; in a new interpreter with `subprocess`); returns its final checkpoint."""
    retrieval_args = (["--retrieved", training_retrieval(world, world_dir, stores, out_dir, keep=max(7, recipe.k))]
                      if retrieval else ["--no-retrieval"])
    run_dir = out_dir / name
    final = run_dir / f"epoch-{recipe.epochs}"
    if not (final / "config.json").is_file():
        cli("train", karpathy_file(world_dir, world, "source"), "--output-dir", run_dir, *retrieval_args,
            "--split", "train", "--encoder", world_dir / world["models"]["clip"],
            "--decoder", world_dir / world["models"]["gpt2"], "--features", out_dir / "features",
            "--epochs", recipe.epochs, "--batch-size", recipe.batch_size, "--lr", recipe.lr,
            "--reduce-factor", recipe.reduce_factor, "--k", recipe.k, "--seed", seed, "--no-progress",
            *(["--resume"] if any(run_dir.glob("*/training_state")) else []), subprocess=subprocess)
    return final


def evaluate_conditions(world_dir: Path, world: dict, stores: dict[str, Path], models: dict[str, Path],
                        out_dir: Path) -> dict[str, dict]:
    """Predict and score every condition on its domain's test split; adds word and content statistics."""
    results = {}
    for name, domain, model, datastores in CONDITIONS:
        slug = condition_slug(name)
        preds, scores = out_dir / f"{slug}.preds.json", out_dir / f"{slug}.scores.json"
        data = karpathy_file(world_dir, world, domain)
        if datastores == ("oracle",):
            retrieval = ["--retrieved", write_oracle_retrieval(data, out_dir / f"{domain}.oracle_retrieved.json")]
        else:
            retrieval = [arg for store in datastores for arg in ("--datastore", stores[store])] or ["--no-retrieval"]
        started = time.perf_counter()
        if not preds.is_file():
            cli("predict", data, "--split", "test", "--model", models[model], *retrieval, "--out", preds,
                "--batch-size", 32)
        predict_s = time.perf_counter() - started
        if not scores.is_file():
            cli("evaluate", "--references", data, "--split", "test", "--predictions", preds, "--out", scores,
                "--metrics", ",".join(("BLEU", "METEOR", "ROUGE-L", "CIDEr")))
        scored = json.loads(scores.read_text(encoding="utf-8"))
        captions = {row["image_id"]: row["caption"] for row in json.loads(preds.read_text(encoding="utf-8"))}
        results[name] = {"domain": domain, "model": model, "datastores": list(datastores),
                         "images": scored["num_images"], "scores": {m: scored["scores"][m] for m in METRICS},
                         **caption_statistics(data, world, captions), "predict_s": round(predict_s, 1)}
    return results


def write_oracle_retrieval(karpathy: Path, out_path: Path, k: int = 4, seed: int = 0) -> Path:
    """A perfect retriever's `{image_id: [captions]}` for the test images of a Karpathy file: one caption of each
    of the k training images whose objects (shape, colour) overlap the test image's most (Jaccard; ties broken
    at random, seeded), most similar first. Written once; returns `out_path`."""

    from smallcap.io import atomic_write_json

    if out_path.is_file():
        return out_path
    rng = random.Random(seed)
    images = json.loads(karpathy.read_text(encoding="utf-8"))["images"]
    content = {image["cocoid"]: frozenset((o["shape"], o["colour"]) for o in image["scene"]["objects"])
               for image in images}
    train = [image for image in images if image["split"] == "train"]
    retrieved = {}
    for image in (image for image in images if image["split"] == "test"):
        mine = content[image["cocoid"]]
        ranked = sorted(train, key=lambda other: (-len(mine & content[other["cocoid"]]) / len(
            mine | content[other["cocoid"]]), rng.random()))
        retrieved[str(image["cocoid"])] = [rng.choice(other["sentences"])["raw"] for other in ranked[:k]]
    atomic_write_json(out_path, retrieved)
    return out_path


def caption_statistics(karpathy: Path, world: dict, captions: dict[int, str]) -> dict:
    """How the captions relate to the domains' words and to what the images show.

    target_word_captions: share of captions using at least one target-only word (shape or colour);
    target_word_tokens: share of all caption tokens that are target-only words; source_word_captions: the
    same as the first for source-only words; content_correct: share of captions naming exactly the image's
    shapes and no colour it lacks; reference_*: the same shares for the test images' reference captions.
    """
    from smallcap.miniworld.captions import caption_tokens, describes_content
    from smallcap.miniworld.world import Scene, SceneObject

    words = {domain: set(info["content_words"]) for domain, info in world["domains"].items()}
    entries = {image["cocoid"]: image for image in json.loads(karpathy.read_text(encoding="utf-8"))["images"]
               if image["cocoid"] in captions}
    references = [s["raw"] for image in entries.values() for s in image["sentences"]]

    def shares(texts: list[str]) -> dict[str, float]:
        tokens = [caption_tokens(text) for text in texts]
        return {"target_word_captions": _mean([bool(words["target"] & set(t)) for t in tokens]),
                "target_word_tokens": _mean([w in words["target"] for t in tokens for w in t]),
                "source_word_captions": _mean([bool(words["source"] & set(t)) for t in tokens])}

    def scene(image: dict) -> Scene:
        objects = [SceneObject(**obj) for obj in image["scene"]["objects"]]
        return Scene("", 0, image["scene"]["background"], objects)

    content = [describes_content(captions[i], scene(image)) for i, image in entries.items()]
    reference_content = [describes_content(s["raw"], scene(image)) for image in entries.values()
                         for s in image["sentences"]]
    return {**shares(list(captions.values())), "content_correct": _mean(content),
            **{f"reference_{key}": value for key, value in shares(references).items()},
            "reference_content_correct": _mean(reference_content)}


def _mean(flags) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def run_experiment(work_dir: str | Path, config: ExperimentConfig, progress: bool = True, jobs: int = 1) -> dict:
    """World -> datastores -> training -> predictions -> scores under `work_dir`; returns the results with
    per-stage timings. Rerun on the same `work_dir` with the same configuration, finished stages are reused (an
    interrupted run continues). `jobs` >= 2 runs the independent trainings (mini CLIP and mini GPT-2; SmallCap
    with and without retrieval) side by side in separate processes, with the same results."""
    from smallcap.io import atomic_write_json

    work_dir = Path(work_dir)
    recorded = work_dir / "experiment.json"
    if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) != json.loads(json.dumps(asdict(config))):
        raise SmallCapError(f"{work_dir} holds a run with another configuration ({recorded}); its finished stages "
                            "cannot be reused: choose another working directory")
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(recorded, asdict(config))
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - started - sum(timings.values()), 1)

    world_dir = work_dir / "world"
    world = build_world_dir(world_dir, config, progress, jobs)
    lap("world_and_pretraining")
    stores = build_datastores(world_dir, world, work_dir / "datastores")
    lap("datastores")
    models = train_models(world_dir, world, stores, work_dir / "training", config.training, config.seed,
                          jobs)
    lap("training")
    conditions = evaluate_conditions(world_dir, world, stores, models, work_dir / "predictions")
    lap("predict_and_evaluate")
    timings["total"] = round(time.perf_counter() - started, 1)
    return {"config": asdict(config), "world": {"images": {d: info["images"] for d, info in world["domains"].items()},
                                                 "target_only_words": world["domains"]["target"]["content_words"],
                                                 "pretraining_metrics": world["metrics"],
                                                 "pretraining_timings_s": world["timings_s"]},
            "conditions": conditions, "effects": effects(conditions), "timings_s": timings,
            "environment": {**environment(), "jobs": jobs}}


def effects(conditions: dict[str, dict], metric: str = "CIDEr") -> dict[str, float]:
    """The differences the experiment is about, in `metric` points."""
    score = {name: result["scores"][metric] for name, result in conditions.items()}
    return {
        "source: retrieval - no retrieval": score["source/source datastore"] - score["source/no retrieval"],
        "source: oracle retrieval - no retrieval": score["source/oracle retrieval"] - score["source/no retrieval"],
        "target: target datastore - source datastore": score["target/target datastore"] - score["target/source datastore"],
        "target: target datastore - no retrieval": score["target/target datastore"] - score["target/no retrieval"],
        "target: source+target - source datastore":
            score["target/source+target datastores"] - score["target/source datastore"],
    }


def write_results(out: Path, results: dict, text: str) -> None:
    """Write `results` to `out` (JSON) and `text` beside it (`.md`), atomically, and print the text."""
    from smallcap.io import atomic_write_json, atomic_write_text

    atomic_write_json(out, results)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)


def environment() -> dict:
    """Where the numbers come from."""
    import torch

    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "argv": sys.argv}


def markdown_table(results: dict) -> str:
    """The results as a markdown table: one row per condition, metrics x100 and caption statistics in %."""
    lines = ["| test domain | retrieval | BLEU-4 | METEOR | ROUGE-L | CIDEr | captions with target-only words "
             "| content correct |", "|---|---|--:|--:|--:|--:|--:|--:|"]
    for name, result in results["conditions"].items():
        domain, retrieval = name.split("/", 1)
        cells = " | ".join(f"{result['scores'][m]:.1f}" for m in METRICS)
        lines.append(f"| {domain} | {retrieval} | {cells} | {100 * result['target_word_captions']:.0f}% "
                     f"| {100 * result['content_correct']:.0f}% |")
    return "\n".join(lines)
