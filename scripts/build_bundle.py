"""Build the offline default that ships inside the package: src/smallcap/assets/miniworld/.

    python scripts/build_bundle.py [--seed 0] [--work DIR] [--preset small]

Runs the miniworld experiment's pipeline (benchmarks/miniworld_experiment.py: world, datastores, `smallcap train`
with retrieval on the source domain) and assembles:

    smallcap/             the mini SmallCap trained with retrieval (`--model mini`), with its tokenizer and image
                          processor, without its optimizer state
    clip/                 the mini CLIP, retrieval encoder of the datastores (`mini-clip`)
    datastores/source/    the source domain's training captions (`--datastore mini-source`)
    datastores/target/    the target domain's training captions (`--datastore mini-target`)
    samples/              three held-out test images of each domain
    bundle.json           provenance: seed, recipes, world metrics, sizes

The bundle is built at the `small` preset, the size CI's pipeline test trains and checks: about 10 MiB, where the
default preset's (12,000 captions per datastore, a 3-layer GPT-2) would take about 18 MiB.

The datastores are built with `--encoder mini-clip`, so their manifests name the encoder by its short name and
work from any install path. With --work, finished stages found there are reused (e.g. the work directory of
`benchmarks/miniworld.py --work DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

SAMPLES_PER_DOMAIN = 3


def build_bundle(work: Path, seed: int, preset: str = "small") -> Path:
    """Train (or reuse) the pipeline's models under `work` and write the bundle directory; returns it."""
    from smallcap.hub import BUNDLE_DIR, BUNDLED_DATASTORES, BUNDLED_MODELS
    from smallcap.io import atomic_write_json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the experiment harness
    from miniworld_experiment import (ExperimentConfig, build_datastores, build_world_dir, cli, karpathy_file,
                                      train_models)

    config = ExperimentConfig(seed=seed, preset=preset)
    world_dir = work / "world"
    world = build_world_dir(world_dir, config)
    stores = build_datastores(world_dir, world, work / "datastores")
    model = train_models(world_dir, world, stores, work / "training", config.training, seed)["rag"]
    # Built in place (the datastores are built with the short names, which resolve into BUNDLE_DIR); a failed
    # run leaves a partial bundle that the next run replaces.
    shutil.rmtree(BUNDLE_DIR, ignore_errors=True)
    BUNDLE_DIR.mkdir(parents=True)
    shutil.copytree(model, BUNDLE_DIR / "smallcap", ignore=shutil.ignore_patterns("training_state"))
    shutil.copytree(world_dir / world["models"]["clip"], BUNDLE_DIR / "clip")
    # The checkpoint config names its base models by the paths they were trained from (a temporary world):
    # name them by what the bundle ships instead (the decoder's tokenizer is in the checkpoint itself).
    config_path = BUNDLE_DIR / "smallcap" / "config.json"
    model_config = json.loads(config_path.read_text(encoding="utf-8"))
    model_config["encoder"]["_name_or_path"], model_config["decoder"]["_name_or_path"] = "mini-clip", "mini"
    atomic_write_json(config_path, model_config)
    here = Path.cwd()
    os.chdir(world_dir)  # the manifests record the input files relative to the world, not a temporary path
    try:
        for domain in world["domains"]:
            # raw sentences, as the bundled model was trained and every miniworld result was measured with
            cli("datastore", "build", world["domains"][domain]["karpathy"], "--out", BUNDLE_DIR / "datastores" / domain,
                "--encoder", "mini-clip", "--tokenizer", "mini", "--text", "raw")
    finally:
        os.chdir(here)
    (BUNDLE_DIR / "samples").mkdir()
    samples = {}
    for domain in world["domains"]:
        karpathy = karpathy_file(world_dir, world, domain)
        entries = json.loads(karpathy.read_text(encoding="utf-8"))["images"]
        for image in [entry for entry in entries if entry["split"] == "test"][:SAMPLES_PER_DOMAIN]:
            shutil.copy(karpathy.parent / image["filepath"] / image["filename"], BUNDLE_DIR / "samples" / image["filename"])
            samples[image["filename"]] = [sentence["raw"] for sentence in image["sentences"]]
    files = sorted(path for path in BUNDLE_DIR.rglob("*") if path.is_file())
    atomic_write_json(BUNDLE_DIR / "bundle.json", {
        "built_by": "scripts/build_bundle.py", "config": asdict(config),
        "names": {name: relative for name, relative in {**BUNDLED_MODELS, **BUNDLED_DATASTORES}.items()},
        "world": {"images": {d: info["images"] for d, info in world["domains"].items()},
                  "content_words": {d: info["content_words"] for d, info in world["domains"].items()},
                  "pretraining_metrics": world["metrics"]},
        "samples": samples,
        "bytes": {path.relative_to(BUNDLE_DIR).as_posix(): path.stat().st_size for path in files}})
    return BUNDLE_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="small", help="world preset (`default`: a larger bundle, ~18 MiB)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="miniworld-bundle-"))
    try:
        bundle = build_bundle(work, args.seed, args.preset)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file())
    print(f"wrote {bundle} ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
