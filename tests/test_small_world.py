"""The small miniature world, built once, and SmallCap's method end to end on it.

One file on purpose: building the world and pretraining its CLIP and GPT-2 takes minutes, and the tests run with
`--dist loadfile`, so everything that needs the world shares one build on one worker (conftest puts this file first,
as it is the longest). The build tests check what `scripts/build_miniworld.py --small` writes: reader-ready files,
a tokenizer, a mini CLIP and a mini GPT-2 that load with the Hugging Face classes and work. The pipeline test runs
`benchmarks/miniworld.py` the way a user does on that world and asserts the direction of the effects that hold over
seeds, with margins measured over five of them (see MARGINS): the training-free transfer to the target domain, and
the source-domain gain from retrieval when the retrieved captions are right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel, GPT2LMHeadModel, GPT2Tokenizer

from conftest import CLIP_TOKENIZER_DIR, REPO
from smallcap.miniworld.captions import caption_tokens
from smallcap.miniworld.clip import retrieval_metrics
from smallcap.miniworld.lm import smallcap_prompt
from smallcap.miniworld.world import DOMAINS, Scene, SceneObject
from smallcap.retrieval.encoders import HFCLIPEncoder

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    """The small miniworld (seed 0), built once with `scripts/build_miniworld.py OUT --small --jobs 2` the way
    a user runs it (mini CLIP and mini GPT-2 train side by side: the same models, and this file bounds the suite's
    wall time). It lies at RUN/world so that the pipeline test's `benchmarks/miniworld.py --work RUN` reuses it
    (same seed and preset) instead of building and pretraining it a second time."""
    out = tmp_path_factory.mktemp("miniworld") / "run" / "world"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_miniworld.py"), str(out), "--small",
                             "--quiet", "--threads", "1", "--jobs", "2", "--clip-tokenizer", str(CLIP_TOKENIZER_DIR)],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr
    return out


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
    are this module's `small_world`, which the benchmark finds in its work directory and reuses."""
    work = small_world.parent
    out = work.parent / "results.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "miniworld.py"), "--preset", "small", "--seed", "0",
         "--work", str(work), "--out", str(out), "--quiet", "--jobs", "2"],
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


# ---------------------------------------------------------------- what the build writes


@pytest.mark.slow
def test_build_refuses_to_overwrite(small_world):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_miniworld.py"), str(small_world),
                             "--small"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "already exists" in result.stderr


@pytest.mark.slow
def test_karpathy_and_coco_files_have_the_reader_formats(small_world):
    world = json.loads((small_world / "world.json").read_text())
    for domain, info in world["domains"].items():
        karpathy = json.loads((small_world / info["karpathy"]).read_text())
        entries = karpathy["images"]
        assert len(entries) == 300 and {e["split"] for e in entries} == {"train", "val", "test"}
        for entry in entries[:50]:
            assert {"imgid", "cocoid", "filename", "filepath", "split", "sentences"} <= entry.keys()
            assert len(entry["sentences"]) == 5
            assert all(s["tokens"] == caption_tokens(s["raw"]) for s in entry["sentences"])
            with Image.open(small_world / info["image_root"] / entry["filepath"] / entry["filename"]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
        for split, path in info["coco_annotations"].items():
            coco = json.loads((small_world / path).read_text())
            ids = {im["id"] for im in coco["images"]}
            assert ids == {e["cocoid"] for e in entries if e["split"] == split}
            assert all(a["image_id"] in ids and isinstance(a["caption"], str) for a in coco["annotations"])
            assert len(coco["annotations"]) == 5 * len(ids)
            assert all((small_world / info["coco_image_dir"] / im["file_name"]).is_file() for im in coco["images"])


@pytest.mark.slow
def test_gpt2_tokenizer_has_smallcap_special_ids_and_round_trips(small_world):
    world = json.loads((small_world / "world.json").read_text())
    path = small_world / world["models"]["gpt2"]
    tokenizer = GPT2Tokenizer.from_pretrained(path)
    assert type(AutoTokenizer.from_pretrained(path)).__name__ == "GPT2Tokenizer"
    assert tokenizer.encode("!") == [0] and tokenizer.encode(".") == [13] and tokenizer.encode(" ") == [220]
    assert world["tokens"]["pad_token_id"] == 0 and world["tokens"]["eos_token_id"] == 13
    assert tokenizer.encode("a") == [64]  # no BOS is added
    assert len(tokenizer) < 1100
    karpathy = json.loads((small_world / "target" / "dataset_target.json").read_text())
    for entry in karpathy["images"][:100]:
        for sentence in entry["sentences"]:
            ids = tokenizer.encode(sentence["raw"] + ".")
            assert tokenizer.decode(ids) == sentence["raw"] + "." and ids[-1] == 13
            assert len(ids) <= 25
    prompt = tokenizer.encode(smallcap_prompt(["a purple star"] * 4))
    assert prompt[-1] == 220 and prompt.count(13) == 1


@pytest.mark.slow
def test_mini_clip_loads_and_retrieves_far_better_than_chance(small_world):
    world = json.loads((small_world / "world.json").read_text())
    clip_dir = small_world / world["models"]["clip"]
    model = CLIPModel.from_pretrained(clip_dir)
    assert model.config.vision_config.image_size == 64
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    encoder = HFCLIPEncoder.from_pretrained(str(clip_dir))
    for domain in DOMAINS:
        # Measured again here from the files on disk, not taken from the report.
        entries = json.loads((small_world / domain / f"dataset_{domain}.json").read_text())["images"]
        datastore = [s["raw"] for e in entries if e["split"] == "train" for s in e["sentences"]]

        def metrics(splits):
            held_out = [e for e in entries if e["split"] in splits]
            images = [Image.open(small_world / domain / e["filepath"] / e["filename"]).convert("RGB")
                      for e in held_out]
            scenes = [Scene(domain, e["cocoid"], e["scene"]["background"],
                            [SceneObject(**o) for o in e["scene"]["objects"]]) for e in held_out]
            return retrieval_metrics(encoder, images, scenes, [[s["raw"] for s in e["sentences"]] for e in held_out],
                                     datastore)

        assert metrics({"test"})["recall@5"] == pytest.approx(world["metrics"]["retrieval"][domain]["recall@5"])
        held_out = metrics({"val", "test"})
        assert held_out["recall@1"] > 2 * held_out["recall@1_chance"], (domain, held_out)
        assert held_out["recall@5"] > 2 * 5 * held_out["recall@1_chance"], (domain, held_out)  # chance ~5x @1


@pytest.mark.slow
def test_mini_gpt2_loads_and_reads_the_similar_captions(small_world):
    world = json.loads((small_world / "world.json").read_text())
    path = small_world / world["models"]["gpt2"]
    model, tokenizer = GPT2LMHeadModel.from_pretrained(path).eval(), GPT2Tokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    for domain, ppl in world["metrics"]["language_model"].items():
        assert ppl["caption_ppl_with_similar_captions"] < ppl["caption_ppl_without_context"], (domain, ppl)
        assert ppl["sequence_ppl"] < 10, (domain, ppl)
    # The caption is likelier after similar captions that contain its words than after other captions.
    def log_likelihood(context: list[str], caption: str) -> float:
        prompt = tokenizer.encode(smallcap_prompt(context))
        ids = torch.tensor([prompt + tokenizer.encode(caption) + [13]])
        with torch.inference_mode():
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        return float(logprobs[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt):]].sum())

    hearts = ["a purple heart on a white background", "a purple heart", "a violet heart shape", "two purple hearts"]
    stars = ["an orange star on the left", "two orange stars", "an orange star shape", "a big orange star"]
    circles = ["a red circle on a black background", "a red disc", "two red circles", "a crimson circle"]
    gains = {(caption, wrong[0]): log_likelihood(right, caption) - log_likelihood(wrong, caption)
             for caption, right, wrong in (("a purple heart", hearts, stars), ("an orange star", stars, hearts),
                                           ("a red circle", circles, hearts), ("a purple heart", hearts, circles))}
    # Every caption is likelier after its own kind of captions; by more than 1 nat on average (a single case at
    # the small CI size was seen at only +0.2 nats).
    assert all(gain > 0 for gain in gains.values()), gains
    assert sum(gains.values()) / len(gains) > 1.0, gains
