"""The miniature world: deterministic data, disjoint domain vocabularies, reader-ready files, and a small
build whose tokenizer, mini CLIP and mini GPT-2 load with the Hugging Face classes and work."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import CLIP_TOKENIZER_DIR, REPO
from smallcap.miniworld.captions import caption_tokens, captions_for, describes_content, domain_words
from smallcap.miniworld.export import sample_world, write_world
from smallcap.miniworld.lm import smallcap_prompt
from smallcap.miniworld.world import DOMAINS, render


def _file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_world(sample_world(seed, 20), tmp_path / name, seed, progress=False)
    a, b, c = (_file_digests(tmp_path / name) for name in "abc")
    assert a == b
    assert len(a) == 2 * (20 + 4)  # per domain: 20 images, one Karpathy file, three COCO files
    assert a.keys() == c.keys() and sum(a[k] != c[k] for k in a) > 40


def test_scene_i_does_not_depend_on_world_size():
    small, large = sample_world(5, 10), sample_world(5, 30)
    by_id = {image.cocoid: image for image in large}
    for image in small:
        assert by_id[image.cocoid].captions == image.captions
        assert render(by_id[image.cocoid].scene, 5).tobytes() == render(image.scene, 5).tobytes()


def test_five_distinct_captions_that_name_what_the_image_shows():
    for image in sample_world(0, 200):
        assert len(set(image.captions)) == 5
        assert all(describes_content(caption, image.scene) for caption in image.captions)
        assert 1 <= len(image.scene.objects) <= 3


def test_target_words_never_occur_in_source_captions():
    images = sample_world(0, 2000) + sample_world(0, 500, stream="web")
    source_words = {w for i in images if i.domain == "source" for c in i.captions for w in caption_tokens(c)}
    target_only = domain_words(DOMAINS["target"])
    assert {"star", "heart", "purple", "orange"} <= target_only
    assert not source_words & target_only
    assert domain_words(DOMAINS["source"]) <= source_words  # the source uses all its own words
    # ... and every target caption needs at least one word the source never uses; the rest is shared.
    target_captions = [c for i in images if i.domain == "target" for c in i.captions]
    assert all(set(caption_tokens(c)) & target_only for c in target_captions)
    shared = {w for c in target_captions for w in caption_tokens(c)} - target_only
    assert shared <= source_words


def test_captions_differ_in_wording_like_coco():
    images = sample_world(1, 100)
    assert len({c.split()[0] for i in images for c in i.captions}) >= 5
    assert any("disc" in c for i in images for c in i.captions) and any("circle" in c for i in images
                                                                        for c in i.captions)
    scene = images[0].scene
    assert captions_for(scene, 1) == images[0].captions
    assert captions_for(scene, 2) != images[0].captions


def test_smallcap_prompt_is_the_reference_template():
    assert smallcap_prompt(["a red circle", "two blue boxes"]) == \
        "Similar images show\n\na red circle\n\ntwo blue boxes.\n\nThis image shows "
    assert smallcap_prompt([]) == "This image shows "


def test_mini_clip_preprocessing_is_the_saved_image_processor():
    import torch

    from smallcap.miniworld.clip import image_processor, normalise, pixel_array

    images = [render(i.scene, 0) for i in sample_world(0, 4)]
    expected = image_processor()(images=images, return_tensors="pt").pixel_values
    assert torch.allclose(normalise(pixel_array(images)), expected, atol=1e-5)


def test_cut_down_clip_tokenizer_splits_world_captions_like_clip(tmp_path):
    from transformers import CLIPTokenizer

    from smallcap.miniworld.tokenization import prune_clip_tokenizer

    captions = [c for i in sample_world(0, 100) for c in i.captions]
    mini = prune_clip_tokenizer(CLIP_TOKENIZER_DIR, captions, tmp_path)
    full = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    assert len(mini) < 1000
    for caption in captions:
        assert mini.tokenize(caption) == full.tokenize(caption)
    assert mini.decode(mini("a Zebra!").input_ids, skip_special_tokens=True) == "a zebra !"  # unseen: bytes


# ---------------------------------------------------------------- a small build, end to end (conftest's small_world)


@pytest.mark.slow  # builds the small world (session fixture, minutes)
def test_build_refuses_to_overwrite(small_world):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_miniworld.py"), str(small_world),
                             "--small"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "already exists" in result.stderr


@pytest.mark.slow  # builds the small world (session fixture, minutes)
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


@pytest.mark.slow  # builds the small world (session fixture, minutes)
def test_gpt2_tokenizer_has_smallcap_special_ids_and_round_trips(small_world):
    from transformers import AutoTokenizer, GPT2Tokenizer

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


@pytest.mark.slow  # builds the small world (session fixture, minutes)
def test_mini_clip_loads_and_retrieves_far_better_than_chance(small_world):
    from transformers import CLIPModel

    from smallcap.miniworld.clip import retrieval_metrics
    from smallcap.miniworld.world import Scene, SceneObject
    from smallcap.retrieval.encoders import HFCLIPEncoder

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


@pytest.mark.slow  # builds the small world (session fixture, minutes)
def test_mini_gpt2_loads_and_reads_the_similar_captions(small_world):
    import torch
    from transformers import GPT2LMHeadModel, GPT2Tokenizer

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
