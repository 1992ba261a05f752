"""The encoder-state cache on real COCO images with a tiny CLIP: values, lazy reads, resume, refusals, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, run_cli

from smallcap.errors import SmallCapError
from smallcap.features import EncoderInfo, FeatureCache, extract_features

TRAIN_IMAGES = sorted((COCO_MINI / "train2017").glob("*.jpg"))


def _pairs(n):
    return [(path.stem.lstrip("0"), path) for path in TRAIN_IMAGES[:n]]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    from transformers import AutoImageProcessor, CLIPVisionModel

    return CLIPVisionModel.from_pretrained(tiny_clip_dir).eval(), AutoImageProcessor.from_pretrained(tiny_clip_dir)


def test_cache_holds_the_encoder_states_and_reads_them_lazily(clip, tmp_path):
    from PIL import Image

    encoder, processor = clip
    report = extract_features(_pairs(6), encoder, tmp_path / "cache", processor=processor, batch_size=4,
                              shard_size=4, progress=False)
    assert (report.encoded, report.cached, report.skipped) == (6, 0, {})
    cache = FeatureCache(tmp_path / "cache")
    assert len(cache) == 6 and cache.num_shards == 2
    assert cache.encoder == EncoderInfo.of(encoder)
    for image_id, path in _pairs(6):
        with Image.open(path) as image:
            pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = encoder(pixel_values=pixels).last_hidden_state[0].numpy()
        stored = cache[image_id]
        assert isinstance(stored.base, np.memmap) or isinstance(stored, np.memmap)
        assert stored.shape == (50, 64) and stored.dtype == np.float32
        np.testing.assert_allclose(stored, expected, atol=1e-5)


def test_an_interrupted_extraction_continues_where_it_stopped(clip, tmp_path, monkeypatch):
    encoder, processor = clip
    full = tmp_path / "full"
    extract_features(_pairs(7), encoder, full, processor=processor, batch_size=2, shard_size=2, progress=False)

    calls = {"n": 0}
    forward = encoder.forward

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third batch
        return forward(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(_pairs(7), encoder, tmp_path / "cache", processor=processor, batch_size=2, shard_size=2,
                         progress=False)
    assert len(FeatureCache(tmp_path / "cache")) == 4  # two complete shards survived the interruption
    monkeypatch.setattr(encoder, "forward", forward)
    report = extract_features(_pairs(7), encoder, tmp_path / "cache", processor=processor, batch_size=2,
                              shard_size=2, progress=False)
    assert (report.encoded, report.cached) == (3, 4)
    resumed, fresh = FeatureCache(tmp_path / "cache"), FeatureCache(full)
    assert sorted(resumed) == sorted(fresh)
    for image_id in fresh:
        np.testing.assert_array_equal(resumed[image_id], fresh[image_id])
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left behind


def test_a_cache_made_with_another_encoder_is_refused(clip, tmp_path):
    from transformers import CLIPVisionModel

    encoder, processor = clip
    extract_features(_pairs(2), encoder, tmp_path / "cache", processor=processor, progress=False)
    torch.manual_seed(1)
    other = CLIPVisionModel(encoder.config).eval()
    with pytest.raises(SmallCapError, match="made with another encoder"):
        extract_features(_pairs(3), other, tmp_path / "cache", processor=processor, progress=False)
    with pytest.raises(SmallCapError, match="float32"):
        extract_features(_pairs(3), encoder, tmp_path / "cache", processor=processor, fp16=True, progress=False)


def test_missing_files_fail_up_front_and_broken_images_are_skipped_and_counted(clip, tmp_path):
    encoder, processor = clip
    with pytest.raises(SmallCapError, match="1 of 3 image files do not exist"):
        extract_features(_pairs(2) + [("404", tmp_path / "missing.jpg")], encoder, tmp_path / "a",
                         processor=processor, progress=False)
    assert not (tmp_path / "a").exists()

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(TRAIN_IMAGES[0].read_bytes()[:300])  # a truncated download
    report = extract_features(_pairs(2) + [("999", broken)], encoder, tmp_path / "b", processor=processor,
                              progress=False)
    assert report.encoded == 2 and list(report.skipped) == ["999"] and "broken.jpg" in report.skipped["999"]
    cache = FeatureCache(tmp_path / "b")
    assert "999" not in cache and "999" in cache.skipped and len(cache) == 2


@pytest.mark.slow
def test_cli_extracts_a_coco_split_and_is_resumable(tiny_clip_dir, tmp_path):
    annotations = COCO_MINI / "annotations" / "captions_train2017.json"
    out = tmp_path / "features"
    # The image folder is found next to annotations/ (coco-mini/train2017), as in the COCO download layout.
    result = run_cli("features", "extract", annotations, "--model", tiny_clip_dir, "--out", out, "--fp16")
    n_images = len(json.loads(annotations.read_text())["images"])
    assert f"encoded {n_images} images, 0 already cached" in result.stdout
    cache = FeatureCache(out)
    assert len(cache) == n_images and cache[next(iter(cache))].dtype == np.float16
    again = run_cli("features", "extract", annotations, "--model", tiny_clip_dir, "--out", out, "--fp16")
    assert f"encoded 0 images, {n_images} already cached" in again.stdout

    wrong_split = run_cli("features", "extract", annotations, "--model", tiny_clip_dir, "--out", tmp_path / "x",
                          "--split", "val", check=False)
    assert wrong_split.returncode == 2
    assert "no captions in split 'val'" in wrong_split.stderr and "Traceback" not in wrong_split.stderr
