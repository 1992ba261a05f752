"""The paper's MSR-VTT experiment with this project's commands, on a tiny MSR-VTT-format data set made in-test:
real video clips (PyAV) panning over real COCO images, captioned with those images' COCO captions.

datastore build (train split) -> predict (test split, videos tiled 2x2, retrieval) -> evaluate (test split).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import COCO_MINI, GPT2_TOKENIZER_DIR, run_cli
from smallcap.captioner import Captioner
from smallcap.clipscore import PREFIX
from smallcap.errors import SmallCapError
from smallcap.evaluation import evaluate, load_references
from smallcap.images import load_image
from smallcap.retrieval.datastore import Datastore
from smallcap.retrieval.encoders import HFCLIPEncoder
from test_video import write_clip

# MSR-VTT's own id style: test videos are video7010..video9999.
SPLITS = {"video0": "train", "video1": "train", "video7010": "test", "video7011": "test", "video6513": "validate"}


def pan(image: Image.Image, frames: int = 8, size: tuple[int, int] = (128, 96)) -> list[np.ndarray]:
    """A camera pan across `image`: crops sliding left to right, resized to `size` (even sides, for yuv420p)."""
    width, height = image.size
    crop = (int(width * 0.8), int(height * 0.8))
    steps = np.linspace(0, width - crop[0], frames).astype(int)
    return [np.asarray(image.crop((x, 0, x + crop[0], crop[1])).resize(size)) for x in steps]


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    """`annotations.json` in MSR-VTT's format and `videos/<video_id>.mp4` for the train and test videos."""
    root = tmp_path_factory.mktemp("msrvtt")
    coco = json.loads((COCO_MINI / "annotations/captions_val2017.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])[10:10 + len(SPLITS)]
    sentences, captions = [], {}
    (root / "videos").mkdir()
    for video_id, image in zip(SPLITS, images):
        captions[video_id] = [a["caption"] for a in sorted(coco["annotations"], key=lambda a: a["id"])
                              if a["image_id"] == image["id"]]
        sentences += [{"caption": c, "video_id": video_id, "sen_id": len(sentences) + n}
                      for n, c in enumerate(captions[video_id])]
        if SPLITS[video_id] != "validate":  # no clip: nothing may ask for it
            picture = Image.open(COCO_MINI / "val2017" / image["file_name"]).convert("RGB")
            write_clip(root / "videos" / f"{video_id}.mp4", "libx264", pan(picture), fps=8, options={"g": "4"})
    videos = [{"video_id": v, "id": n, "split": split, "category": 0} for n, (v, split) in enumerate(SPLITS.items())]
    (root / "annotations.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    return root, captions


def test_msrvtt_references_by_split(msrvtt):
    root, captions = msrvtt
    test = load_references(root / "annotations.json", split="test")
    assert test.captions == {v: [" ".join(c.split()) for c in captions[v]] for v in ("video7010", "video7011")}
    assert list(load_references(root / "annotations.json").captions) == list(SPLITS)
    with pytest.raises(SmallCapError, match="no video has split 'val'; splits in the file: test, train, validate"):
        load_references(root / "annotations.json", split="val")
    preds = [{"image_id": "video7010", "caption": "a man"}, {"image_id": "video0", "caption": "a dog"}]
    with pytest.raises(SmallCapError, match=r"1 of 2 predicted image ids are not in .* \(e\.g\. video0\)"):
        evaluate(root / "annotations.json", preds, split="test", metrics=["BLEU"])


@pytest.mark.slow
def test_paper_msrvtt_experiment_through_the_cli(msrvtt, tiny_smallcap, tiny_clip_dir, tmp_path):
    root, captions = msrvtt
    annotations, videos = root / "annotations.json", root / "videos"
    train_captions = {" ".join(c.split()) for v, split in SPLITS.items() if split == "train" for c in captions[v]}

    run_cli("datastore", "build", annotations, "--splits", "train", "--out", tmp_path / "store",
            "--encoder", tiny_clip_dir, "--tokenizer", GPT2_TOKENIZER_DIR)
    store = Datastore.load(tmp_path / "store")
    assert store.manifest["filters"]["counts"]["read"] == len(train_captions)
    assert {store.caption(row) for row in range(len(store))} <= train_captions

    preds = tmp_path / "preds.json"
    result = run_cli("predict", annotations, "--split", "test", "--images-dir", videos, "--datastore",
                     tmp_path / "store", "--model", tiny_smallcap, "--out", preds)
    assert "2 captioned, 0 already done, 0 failed" in result.stderr
    rows = json.loads(preds.read_text())
    assert [row["image_id"] for row in rows] == ["video7010", "video7011"]  # MSR-VTT's string ids, kept
    # predict captioned the tiled clips with captions retrieved from the train-split datastore.
    clips = [videos / f"{row['image_id']}.mp4" for row in rows]
    direct = Captioner.from_pretrained(str(tiny_smallcap), datastores=[str(tmp_path / "store")])(clips)
    assert [r.caption for r in direct] == [row["caption"] for row in rows]
    assert all(len(r.retrieved) == 4 and set(r.retrieved) <= train_captions for r in direct)

    scores, per_image = tmp_path / "scores.json", tmp_path / "per_image.json"
    result = run_cli("evaluate", "--references", annotations, "--split", "test", "--predictions", preds,
                     "--metrics", "BLEU,ROUGE-L,CIDEr", "--clipscore", "--images-dir", videos, "--clip-encoder", tiny_clip_dir, "--device", "cpu",
                     "--out", scores, "--per-image", per_image)
    summary = json.loads(scores.read_text())
    assert summary["num_images"] == 2
    for name in ("BLEU-4", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore"):
        assert isinstance(summary["scores"][name], float), name
    assert "CIDEr" in result.stdout and "RefCLIPScore" in result.stdout
    image_rows = json.loads(per_image.read_text())
    assert [row["image_id"] for row in image_rows] == ["video7010", "video7011"]
    # A video's CLIPScore is that of the 2x2 tile of its frames that the captioner saw.
    encoder = HFCLIPEncoder.from_pretrained(str(tiny_clip_dir))
    tiles = encoder.embed_images([load_image(clip) for clip in clips])
    texts = encoder.embed_texts([PREFIX + row["caption"] for row in rows])
    expected = [100 * 2.5 * max(float(t @ c), 0.0) for t, c in zip(tiles, texts)]
    assert [row["CLIPScore"] for row in image_rows] == pytest.approx(expected, abs=1e-3)
