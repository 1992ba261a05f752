"""CLIPScore / RefCLIPScore in `smallcap evaluate`: the formula, real COCO images with a tiny CLIP, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import COCO_MINI, run_cli
from smallcap.cli import main
from smallcap.clipscore import PREFIX, clip_scores
from smallcap.errors import SmallCapError
from smallcap.evaluation import evaluate
from smallcap.retrieval.encoders import HFCLIPEncoder

VAL = COCO_MINI / "val2017"


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    return vector / np.linalg.norm(vector)


def test_formula_on_hand_made_embeddings():
    image = unit(1, 0, 0)
    captions = np.stack([unit(0.4, np.sqrt(1 - 0.16), 0),  # cos 0.4 with the image
                         unit(-0.3, np.sqrt(1 - 0.09), 0),  # cos -0.3: clipped to 0
                         unit(0, 0, 1)])  # orthogonal to the image and to every reference
    references = [np.stack([unit(0, 1, 0), unit(1, 0, 0)]),  # best reference: cos sqrt(0.84) with caption 0
                  np.stack([unit(0, 1, 0)]),
                  np.stack([unit(0, -1, 0), unit(1, 0, 0)])]
    clip_s, ref_clip_s = clip_scores(np.stack([image] * 3), captions, references)
    assert clip_s == pytest.approx([2.5 * 0.4, 0.0, 0.0])
    ref = np.sqrt(0.84)
    assert ref_clip_s == pytest.approx([2 * 1.0 * ref / (1.0 + ref), 0.0, 0.0])  # harmonic mean; 0 when CLIP-S is 0
    assert not np.isnan(ref_clip_s).any()


class ColourCLIP:
    """A stand-in CLIP whose embedding space is known: an image is its mean colour, a text the sum of the colour
    words it names (red, green, blue), so a caption naming an image's colour is the one that fits it."""

    name, dim = "colour-clip", 3
    WORDS = {"red": 0, "green": 1, "blue": 2}

    def embed_images(self, images, batch_size=64, progress=False):
        means = np.stack([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0) for image in images])
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)

    def embed_texts(self, texts, batch_size=256, progress=False):
        assert all(text.startswith(PREFIX) for text in texts)
        vectors = np.full((len(texts), 3), 1e-3, np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                if word in self.WORDS:
                    vectors[row, self.WORDS[word]] += 1
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_own_caption_scores_higher_than_another_images_caption(tmp_path):
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    images, annotations = [], []
    for n, (word, rgb) in enumerate(colours.items(), start=1):
        Image.new("RGB", (64, 48), rgb).save(tmp_path / f"{word}.png")
        images.append({"id": n, "file_name": f"{word}.png", "domain": "in" if word == "red" else "out"})
        annotations += [{"image_id": n, "caption": f"a {word} square"}, {"image_id": n, "caption": "a square"}]
    refs = {"images": images, "annotations": annotations}
    words = list(colours)

    def scores(shift: int) -> dict:
        preds = [{"image_id": n + 1, "caption": f"a {words[(n + shift) % 3]} picture"} for n in range(3)]
        return evaluate(refs, preds, metrics=["CLIPScore"], images_dir=tmp_path, clip_encoder=ColourCLIP(),
                        per_image=True)

    own, other = scores(0), scores(1)
    assert own["scores"]["CLIPScore"] > other["scores"]["CLIPScore"]
    assert own["scores"]["RefCLIPScore"] > other["scores"]["RefCLIPScore"]
    for mine, theirs in zip(own["per_image"], other["per_image"]):
        assert mine["CLIPScore"] > theirs["CLIPScore"]
    for domain in ("in", "out"):  # nocaps-style domains are scored on their own images
        rows = [row for row in own["per_image"] if row["domain"] == domain]
        assert own["domains"][domain]["scores"]["CLIPScore"] == pytest.approx(np.mean([r["CLIPScore"] for r in rows]))


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    """8 real val2017 images: each image's first human caption is the prediction, the other four the references,
    as COCO-format annotations and as a Karpathy file (filepath/filename relative to coco-mini)."""
    root = tmp_path_factory.mktemp("clipscore")
    coco = json.loads((COCO_MINI / "annotations/captions_val2017.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])[:8]
    by_image = {im["id"]: [] for im in images}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        if ann["image_id"] in by_image:
            by_image[ann["image_id"]].append(ann)
    refs = {"images": images, "annotations": [a for anns in by_image.values() for a in anns[1:]]}
    preds = [{"image_id": i, "caption": anns[0]["caption"]} for i, anns in by_image.items()]
    karpathy = {"images": [{"cocoid": im["id"], "filepath": "val2017", "filename": im["file_name"], "split": "test",
                            "sentences": [{"raw": a["caption"]} for a in by_image[im["id"]][1:]]} for im in images]}
    for name, data in (("refs.json", refs), ("preds.json", preds), ("karpathy.json", karpathy)):
        (root / name).write_text(json.dumps(data))
    return root, images, by_image


def test_scores_equal_a_direct_computation_with_the_encoder(coco_split, tiny_clip_dir):
    root, images, by_image = coco_split
    encoder = HFCLIPEncoder.from_pretrained(str(tiny_clip_dir))
    result = evaluate(root / "refs.json", root / "preds.json", metrics=["CLIPScore"], images_dir=VAL,
                      clip_encoder=encoder, per_image=True)

    pictures = encoder.embed_images([Image.open(VAL / im["file_name"]) for im in images])
    expected_clip, expected_ref = [], []
    for picture, image in zip(pictures, images):
        caption, *references = encoder.embed_texts([PREFIX + a["caption"] for a in by_image[image["id"]]])
        clip_s = 2.5 * max(float(picture @ caption), 0.0)
        ref_s = max(max(float(r @ caption) for r in references), 0.0)
        expected_clip.append(100 * clip_s)
        expected_ref.append(100 * (2 * clip_s * ref_s / (clip_s + ref_s) if clip_s + ref_s else 0.0))
    assert [row["image_id"] for row in result["per_image"]] == [im["id"] for im in images]
    assert [row["CLIPScore"] for row in result["per_image"]] == pytest.approx(expected_clip, abs=1e-3)
    assert [row["RefCLIPScore"] for row in result["per_image"]] == pytest.approx(expected_ref, abs=1e-3)
    assert result["scores"]["CLIPScore"] == pytest.approx(np.mean(expected_clip), abs=1e-3)
    assert result["scores"]["RefCLIPScore"] == pytest.approx(np.mean(expected_ref), abs=1e-3)

    # Karpathy references name the images as filepath/filename: found under the dataset root.
    karpathy = evaluate(root / "karpathy.json", root / "preds.json", metrics=["CLIPScore"], split="test",
                        images_dir=COCO_MINI, clip_encoder=encoder)
    assert karpathy["scores"] == pytest.approx(result["scores"], abs=1e-4)


@pytest.mark.slow
def test_cli_clipscore_next_to_coco_metrics(coco_split, tiny_clip_dir, tmp_path):
    root, images, _ = coco_split
    out, per_image = tmp_path / "scores.json", tmp_path / "per_image.json"
    result = run_cli("evaluate", "--references", root / "refs.json", "--predictions", root / "preds.json",
                     "--metrics", "BLEU,CIDEr", "--clipscore", "--images-dir", VAL, "--clip-encoder", tiny_clip_dir,
                     "--device", "cpu", "--out", out, "--per-image", per_image)
    scores = json.loads(out.read_text())["scores"]
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "CLIPScore", "RefCLIPScore"]
    assert "RefCLIPScore" in result.stdout.splitlines()[0]
    api = evaluate(root / "refs.json", root / "preds.json", metrics=["BLEU", "CIDEr", "CLIPScore"], images_dir=VAL,
                   clip_encoder=tiny_clip_dir, device="cpu")
    assert scores == pytest.approx(api["scores"], abs=1e-4)
    rows = json.loads(per_image.read_text())
    assert len(rows) == len(images) and all({"CIDEr", "CLIPScore", "RefCLIPScore"} <= set(row) for row in rows)


def test_clipscore_input_errors(coco_split, tiny_clip_dir, tmp_path, capsys):
    root, _, _ = coco_split
    refs, preds = root / "refs.json", root / "preds.json"
    with pytest.raises(SmallCapError, match="needs the images: pass --images-dir"):
        evaluate(refs, preds, metrics=["CLIPScore"], clip_encoder=tiny_clip_dir)
    with pytest.raises(SmallCapError, match=r"8 of 8 images for CLIPScore are not in .*e\.g\. image \d+ \(0000"):
        evaluate(refs, preds, metrics=["CLIPScore"], images_dir=tmp_path, clip_encoder=tiny_clip_dir)
    assert main(["evaluate", "--references", str(refs), "--predictions", str(preds), "--images-dir", str(VAL)]) == 2
    assert "--images-dir is only used by CLIPScore; add --clipscore" in capsys.readouterr().err
