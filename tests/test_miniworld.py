"""The miniature world's generator: deterministic data, disjoint domain vocabularies, captions that read like
COCO's. Tests of a whole small build are in test_small_world.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import CLIP_TOKENIZER_DIR
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


def test_a_world_with_a_separate_retriever_trains_it_further_and_datastores_accept_it(tmp_path):
    """A recipe with a retriever saves a second mini CLIP, the captioning one trained further on its own larger web
    (same architecture, other weights), reports its retrieval metrics, and `smallcap datastore build --encoder` takes it."""
    import json

    import torch
    from transformers import CLIPModel

    from conftest import run_cli
    from smallcap.miniworld.build import build_world, recipe_with

    recipe = recipe_with("small", images_per_domain=20, web_images_per_domain=12, clip_steps=4, lm_steps=2,
                         retriever_steps=3, retriever_web_images_per_domain=18)
    recipe.clip.batch_size = recipe.retriever.batch_size = 6
    assert recipe.retriever.steps == 3 and recipe.retriever.lr == recipe.clip.lr / 2
    torch.set_num_threads(1)
    world = build_world(tmp_path / "world", seed=0, recipe=recipe, clip_tokenizer_dir=CLIP_TOKENIZER_DIR,
                        progress=False)
    assert world["models"]["retriever"] == "models/retriever"
    assert set(world["metrics"]["retriever_retrieval"]) == {"source", "target"}
    assert world["recipe"]["retriever"]["steps"] == 3 and world["timings_s"]["retriever"] > 0
    assert world["recipe"]["retriever_web_images_per_domain"] == 18
    clip = CLIPModel.from_pretrained(tmp_path / "world" / "models" / "clip")
    retriever = CLIPModel.from_pretrained(tmp_path / "world" / "models" / "retriever")
    assert clip.config.to_dict()["vision_config"] == retriever.config.to_dict()["vision_config"]
    assert not torch.equal(clip.visual_projection.weight, retriever.visual_projection.weight)
    out = tmp_path / "store"
    run_cli("datastore", "build", str(tmp_path / "world" / "source" / "dataset_source.json"), "--out", str(out),
            "--encoder", str(tmp_path / "world" / "models" / "retriever"),
            "--tokenizer", str(tmp_path / "world" / "models" / "gpt2"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 16 * 5 and manifest["encoder"]["name"].endswith("models/retriever")


def test_two_jobs_build_the_same_world_as_one(tmp_path):
    """`build_world(jobs=2)` trains the mini GPT-2 in a second process beside the mini CLIP: same files, same
    metrics as the one-process build (each training seeds itself), and the report says how it was built."""
    import torch

    from smallcap.miniworld.build import build_world, recipe_with

    recipe = recipe_with("small", images_per_domain=20, web_images_per_domain=12, clip_steps=4, lm_steps=3)
    recipe.clip.batch_size = 6
    torch.set_num_threads(1)
    worlds = {jobs: build_world(tmp_path / f"jobs{jobs}", seed=0, recipe=recipe, clip_tokenizer_dir=CLIP_TOKENIZER_DIR,
                                progress=False, jobs=jobs) for jobs in (1, 2)}
    assert worlds[1]["metrics"] == worlds[2]["metrics"]
    assert [worlds[j]["environment"]["jobs"] for j in (1, 2)] == [1, 2]
    digests = {jobs: {name: digest for name, digest in _file_digests(tmp_path / f"jobs{jobs}").items()
                      if name != "world.json"} for jobs in (1, 2)}
    assert digests[1] == digests[2] and "models/gpt2/model.safetensors" in digests[1]
