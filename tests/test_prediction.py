"""`smallcap predict` then `smallcap evaluate`, end to end through the CLI on real COCO images."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import COCO_MINI, GOLDEN, run_cli

VAL = COCO_MINI / "val2017"


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    """COCO-format annotations for 6 real val2017 images, and a Karpathy file putting 3 of them in `test`."""
    root = tmp_path_factory.mktemp("split")
    coco = json.loads((COCO_MINI / "annotations/captions_val2017.json").read_text())
    images = sorted(coco["images"], key=lambda im: im["file_name"])[6:12]
    ids = {im["id"] for im in images}
    subset = {"images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    (root / "captions.json").write_text(json.dumps(subset))
    karpathy = {"images": [{"cocoid": im["id"], "filepath": "val2017", "filename": im["file_name"],
                            "split": "test" if n < 3 else "train",
                            "sentences": [{"raw": a["caption"]} for a in subset["annotations"]
                                          if a["image_id"] == im["id"]]} for n, im in enumerate(images)]}
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    return root, sorted(ids)


@pytest.mark.slow
def test_predict_then_evaluate_coco_format(small_split, tmp_path):
    root, ids = small_split
    preds = tmp_path / "preds.json"
    result = run_cli("predict", root / "captions.json", "--images-dir", VAL, "--model", GOLDEN, "--no-retrieval",
                     "--out", preds, "--batch-size", "4")
    assert "6 captioned, 0 already done, 0 failed" in result.stderr
    rows = json.loads(preds.read_text())
    assert sorted(r["image_id"] for r in rows) == ids
    assert all(isinstance(r["caption"], str) for r in rows)
    scores = tmp_path / "scores.json"
    run_cli("evaluate", "--references", root / "captions.json", "--predictions", preds, "--out", scores)
    result = json.loads(scores.read_text())
    assert result["num_images"] == 6
    assert set(result["scores"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}


@pytest.mark.slow
def test_predict_karpathy_split_with_retrieved_and_resume(small_split, tmp_path):
    root, ids = small_split
    retrieved = {str(i): [f"a photo number {n}", "a picture"] for n, i in enumerate(ids)}
    (tmp_path / "retrieved.json").write_text(json.dumps(retrieved))
    preds = tmp_path / "preds.json"
    test_ids = [im["cocoid"] for im in json.loads((root / "dataset_coco.json").read_text())["images"]
                              if im["split"] == "test"]
    # An interrupted earlier run: one image done, and a line cut off mid-write.
    partial = tmp_path / "preds.json.partial.jsonl"
    partial.write_text(json.dumps({"image_id": test_ids[0], "caption": "kept from the first run"}) + "\n"
                       + '{"image_id": ' + str(test_ids[1]))
    shutil.copytree(VAL, root / "val2017", dirs_exist_ok=True)
    result = run_cli("predict", root / "dataset_coco.json", "--split", "test", "--model", GOLDEN,
                     "--retrieved", tmp_path / "retrieved.json", "--out", preds)
    assert "2 captioned, 1 already done" in result.stderr
    rows = json.loads(preds.read_text())
    assert [r["image_id"] for r in rows] == test_ids
    assert rows[0]["caption"] == "kept from the first run"
    assert not partial.exists()


@pytest.mark.slow
def test_predict_bad_inputs(small_split, tmp_path):
    root, _ = small_split
    cases = [
        (["predict", tmp_path / "missing.json"], "no such file"),
        (["predict", root / "captions.json", "--images-dir", tmp_path], "image files not found"),
        (["predict", root / "dataset_coco.json", "--split", "nope"], "no images in split 'nope'"),
    ]
    for args, message in cases:
        result = run_cli(*args, "--model", GOLDEN, "--no-retrieval", "--out", tmp_path / "p.json", check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "p.json").exists()


def test_parquet_output_without_pyarrow_is_a_clear_error(monkeypatch, tmp_path):
    """`--out X.parquet` without the parquet extra fails before any captioning, naming the extra to install."""
    import sys

    from smallcap.errors import MissingExtraError
    from smallcap.prediction import predict

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'smallcap\[parquet\]'"):
        predict(None, [(1, VAL / "missing.jpg")], tmp_path / "preds.parquet")
    assert not list(tmp_path.iterdir())


def test_predict_decodes_in_prompt_length_order_with_the_captions_of_one_at_a_time(tmp_path):
    import torch

    from smallcap import cli
    from smallcap.captioner import Captioner

    images = tmp_path / "images"
    images.mkdir()
    paths = sorted(VAL.glob("*.jpg"))[:8]
    for path in paths:
        shutil.copy(path, images)
    annotations = json.loads((COCO_MINI / "annotations/captions_val2017.json").read_text())["annotations"]
    pool = [a["caption"].strip() for a in sorted(annotations, key=lambda a: a["id"])]
    # 4, 1, 3, 2, ... captions: prompt lengths out of order, so sorting really reorders the batches
    retrieved = {str(int(p.stem)): pool[n * 5:n * 5 + 4 - (n * 3) % 4] for n, p in enumerate(paths)}
    (tmp_path / "retrieved.json").write_text(json.dumps(retrieved))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        captioner = Captioner.from_pretrained("mini")
        lengths = [captioner.prompt_length(retrieved[str(int(p.stem))]) for p in paths]
        assert lengths != sorted(lengths) and len(set(lengths)) > 3
        preds = tmp_path / "preds.json"
        assert cli.main(["predict", str(images), "--model", "mini", "--retrieved", str(tmp_path / "retrieved.json"),
                         "--batch-size", "3", "--out", str(preds)]) == 0
        alone = [captioner([p], retrieved=[retrieved[str(int(p.stem))]])[0].caption for p in paths]
    finally:
        torch.set_num_threads(before)
    rows = json.loads(preds.read_text())
    assert [r["image_id"] for r in rows] == [int(p.stem) for p in paths]  # input order kept
    assert [r["caption"] for r in rows] == alone
