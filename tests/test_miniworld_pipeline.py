"""SmallCap's method end to end on the miniworld, and the bundled offline default built from it.

The pipeline test runs `benchmarks/miniworld.py` the way a user does, on a world rebuilt at small size, and
asserts the direction of the effects that hold over seeds, with margins measured over five of them (see MARGINS):
the training-free transfer to the target domain, and the source-domain gain from retrieval when the retrieved
captions are right. The bundle tests run `smallcap demo` and `smallcap caption --model mini --datastore mini-target`
offline, and check how short names resolve.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from smallcap.errors import SmallCapError
from smallcap.hub import BUNDLE_DIR, bundled_name, bundled_path, resolve_datastore, resolve_pretrained
from smallcap.retrieval.datastore import Datastore
from smallcap.retrieval.encoders import canonical_encoder_name

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# CIDEr margins for the small world (`--preset small`), half the smallest effect seen over seeds 0-4
# (benchmarks/results/miniworld_small_seeds.md: +60.5, +61.8 and +7.9 at the smallest). Not asserted: the gain from
# retrieval with the mini CLIP retriever on the source domain, whose sign changes between seeds (-13.7 to +18.5);
# the oracle row shows the model does use right captions, so the retriever is what limits it (README).
MARGINS = {"target: target datastore - source datastore": 30.0,
           "target: target datastore - no retrieval": 30.0,
           "source: oracle retrieval - no retrieval": 4.0}


@pytest.fixture(scope="module")
def experiment(small_world) -> tuple[dict, Path]:
    """`python benchmarks/miniworld.py --preset small`: datastores, training, scores; the world and its pretraining
    are the session's `small_world`, which the benchmark finds in its work directory and reuses."""
    import subprocess

    work = small_world.parent
    out = work.parent / "results.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "miniworld.py"), "--preset", "small", "--seed", "0",
         "--work", str(work), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=1500,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **OFFLINE})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), work


@pytest.mark.slow
def test_target_datastore_transfers_and_right_captions_help(experiment):
    results, _ = experiment
    effects, conditions = results["effects"], results["conditions"]
    for name, margin in MARGINS.items():
        assert effects[name] > margin, (name, effects[name], margin)
    # The mechanism: captions written with target retrieval use the target domain's words, the others (nearly)
    # never. Share of captions with a target word over seeds 0-4 (miniworld_small_seeds.json): 0.9-1.0 with the
    # target datastore, 0-0.067 in every other condition (0.1 once with 2 threads on another CPU); the
    # thresholds split that gap with room on both sides.
    assert conditions["target/target datastore"]["target_word_captions"] > 0.45
    for name in ("target/no retrieval", "target/source datastore", "source/no retrieval", "source/source datastore",
                 "source/oracle retrieval"):
        assert conditions[name]["target_word_captions"] < 0.25, name
    # Target images retrieve target captions from the combined datastores, so combining costs little.
    combined = conditions["target/source+target datastores"]["scores"]["CIDEr"]
    assert combined > conditions["target/source datastore"]["scores"]["CIDEr"] + MARGINS[
        "target: target datastore - source datastore"]


@pytest.mark.slow
def test_results_and_table_cover_every_condition_and_metric(experiment):
    results, _ = experiment
    assert set(results["conditions"]) == {
        "source/no retrieval", "source/source datastore", "source/oracle retrieval", "target/no retrieval",
        "target/source datastore", "target/target datastore", "target/source+target datastores"}
    for result in results["conditions"].values():
        assert result["images"] == 30 and set(result["scores"]) == {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
        assert all(value is not None and 0 <= value for value in result["scores"].values())
    assert set(results["timings_s"]) >= {"world_and_pretraining", "datastores", "training", "total"}


@pytest.mark.slow
def test_training_retrieval_drops_own_captions_and_keeps_7(experiment):
    _, work = experiment
    retrieved = json.loads((work / "training" / "retrieved_train.json").read_text())
    karpathy = json.loads((work / "world" / "source" / "dataset_source.json").read_text())["images"]
    owners: dict[str, set[str]] = {}  # caption text -> the training images that have it
    for image in karpathy:
        if image["split"] == "train":
            for sentence in image["sentences"]:
                owners.setdefault(sentence["raw"], set()).add(str(image["cocoid"]))
    assert set(retrieved) == {i for ids in owners.values() for i in ids}
    for image_id, captions in retrieved.items():
        # 15 neighbours minus at most the image's 5 own captions always leave 7.
        assert len(captions) == 7
        assert all(owners[caption] - {image_id} for caption in captions), image_id


@pytest.mark.slow
def test_oracle_retrieval_puts_captions_of_images_with_the_same_objects_first(experiment):
    _, work = experiment
    oracle = json.loads((work / "predictions" / "source.oracle_retrieved.json").read_text())
    images = json.loads((work / "world" / "source" / "dataset_source.json").read_text())["images"]
    content = {str(i["cocoid"]): frozenset((o["shape"], o["colour"]) for o in i["scene"]["objects"]) for i in images}
    train_captions = {}  # caption -> the contents of the training images that have it
    for image in images:
        if image["split"] == "train":
            for sentence in image["sentences"]:
                train_captions.setdefault(sentence["raw"], set()).add(content[str(image["cocoid"])])
    test = {str(i["cocoid"]) for i in images if i["split"] == "test"}
    assert set(oracle) == test
    train_contents = {c for contents in train_captions.values() for c in contents}
    matched = [image_id for image_id in test if content[image_id] in train_contents]
    assert len(matched) >= len(test) // 2  # most test scenes have a training scene with the same objects
    for image_id, captions in oracle.items():
        assert len(captions) == 4 and all(caption in train_captions for caption in captions)
        if image_id in matched:
            assert content[image_id] in train_captions[captions[0]], image_id


# ---------------------------------------------------------------- the bundle


@pytest.mark.slow
def test_demo_runs_offline_and_shows_the_domain_transfer():
    result = run_cli("demo", "--json", env=OFFLINE)
    rows = json.loads(result.stdout)
    bundle = json.loads((BUNDLE_DIR / "bundle.json").read_text())
    target_words = set(bundle["world"]["content_words"]["target"])
    assert sorted(Path(row["image"]).name for row in rows) == sorted(bundle["samples"])
    for row in rows:
        assert row["error"] is None
        by_store = {entry["datastore"]: entry for entry in row["captions"]}
        assert set(by_store) == {"mini-source", "mini-target"}
        for entry in by_store.values():
            assert entry["caption"] and len(entry["retrieved"]) == 4
        # The model was never trained on target words: with the source datastore it cannot produce them.
        assert not target_words & set(by_store["mini-source"]["caption"].split())
        assert all(target_words & set(caption.split()) for caption in by_store["mini-target"]["retrieved"])
        if Path(row["image"]).name.startswith("target"):
            assert target_words & set(by_store["mini-target"]["caption"].split()), row


@pytest.mark.slow
def test_demo_table_is_readable():
    result = run_cli("demo", env=OFFLINE)
    out = result.stdout
    assert out.count("with mini-source:") == out.count("with mini-target:") == 6
    assert out.count("reference:") == 6 and "retrieved" in out
    assert "Loading weights" not in result.stderr


@pytest.mark.slow
def test_caption_with_bundled_short_names(tmp_path):
    sample = sorted((BUNDLE_DIR / "samples").glob("target_*.png"))[0]
    result = run_cli("caption", sample, "--model", "mini", "--datastore", "mini-target", "--output",
                     tmp_path / "out.jsonl", env=OFFLINE)
    row = json.loads((tmp_path / "out.jsonl").read_text())
    store = Datastore.load("mini-target")
    stored = {store.caption(i) for i in range(len(store))}
    assert row["caption"] and len(row["retrieved"]) == 4 and set(row["retrieved"]) <= stored
    combined = run_cli("caption", sample, "--model", "mini", "--datastore", "mini-source", "--datastore",
                       "mini-target", env=OFFLINE)
    assert json.loads(combined.stdout)["retrieved"] == row["retrieved"]  # target images find target captions
    assert result.returncode == 0


def test_short_names_resolve_to_the_bundle_and_local_paths_win(tmp_path, monkeypatch):
    assert Path(resolve_pretrained("mini")) == BUNDLE_DIR / "smallcap"
    assert Path(resolve_pretrained("mini-clip")) == BUNDLE_DIR / "clip"
    assert resolve_datastore("mini-source") == BUNDLE_DIR / "datastores" / "source"
    assert resolve_datastore("some/dir") == Path("some/dir")
    # Bundled datastores name their encoder by its short name, and the bundled CLIP's path maps back to it.
    for name in ("mini-source", "mini-target"):
        assert Datastore.load(name).encoder_name == "mini-clip"
    assert canonical_encoder_name(str(BUNDLE_DIR / "clip")) == "mini-clip" == bundled_name(BUNDLE_DIR / "clip")
    assert canonical_encoder_name("mini-clip") == "mini-clip"
    # A local directory of the same name is what the user means.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mini").mkdir()
    assert bundled_path("mini") is None and resolve_pretrained("mini") == "mini"
    assert canonical_encoder_name("mini-clip") == "mini-clip"  # no such local path: still the short name


@pytest.mark.slow
def test_short_name_errors_are_clear(monkeypatch, tmp_path):
    with pytest.raises(SmallCapError, match="bundled datastore, not a SmallCap model"):
        resolve_pretrained("mini-target", "SmallCap model")
    result = run_cli("caption", BUNDLE_DIR / "samples", "--model", "mini-source", check=False, env=OFFLINE)
    assert result.returncode == 2 and "--datastore mini-source" in result.stderr
    monkeypatch.setattr("smallcap.hub.BUNDLE_DIR", tmp_path / "nothing")
    with pytest.raises(SmallCapError, match="missing from this installation"):
        resolve_pretrained("mini")


def test_bundle_is_small_and_packaged():
    total = sum(path.stat().st_size for path in BUNDLE_DIR.rglob("*") if path.is_file())
    assert total < 16 * 2**20
    assert not list(BUNDLE_DIR.rglob("training_state"))
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"assets/**/*"' in pyproject
    samples = sorted(path.name for path in (BUNDLE_DIR / "samples").glob("*.png"))
    assert sum(name.startswith("source") for name in samples) >= 3 and sum(
        name.startswith("target") for name in samples) >= 3


@pytest.mark.slow
def test_datastore_retrieve_for_a_folder_of_images(tmp_path):
    out = tmp_path / "retrieved.json"
    run_cli("datastore", "retrieve", "mini-target", "--data", BUNDLE_DIR / "samples", "--k", 6, "--keep", 3,
            "--no-exclude-own", "--out", out, env=OFFLINE)
    retrieved = json.loads(out.read_text())
    assert sorted(retrieved) == sorted(path.stem for path in (BUNDLE_DIR / "samples").glob("*.png"))
    assert all(len(captions) == 3 for captions in retrieved.values())
    bad = run_cli("datastore", "retrieve", "mini-target", "--data", BUNDLE_DIR / "samples", "--keep", 0, "--out",
                  out, check=False, env=OFFLINE)
    assert bad.returncode == 2 and "--keep" in bad.stderr
