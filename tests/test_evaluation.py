"""`smallcap evaluate` against pycocoevalcap's own COCOEvalCap on real COCO captions, and its input errors."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from conftest import COCO_MINI, COCO_VAL_CAPTIONS, run_cli

from smallcap.evaluation import evaluate

COCOEVALCAP_NAMES = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
                     "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
FAST = ("--metrics", "BLEU,CIDEr")


def split_one_human(annotations: Path, images: int | None = None) -> tuple[dict, list[dict]]:
    """Each image's caption with the smallest annotation id becomes the prediction; the rest are references.
    `images`: keep only the first this many images (by id)."""
    data = json.loads(annotations.read_text())
    if images is not None:
        data["images"] = sorted(data["images"], key=lambda img: img["id"])[:images]
        kept = {img["id"] for img in data["images"]}
        data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] in kept]
    by_image: dict[int, list[dict]] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(ann)
    predictions = [{"image_id": img["id"], "caption": by_image[img["id"]][0]["caption"]} for img in data["images"]]
    references = {"images": data["images"],
                  "annotations": [ann for img in data["images"] for ann in by_image[img["id"]][1:]]}
    return references, predictions


def write_split(directory: Path, annotations: Path, images: int | None = None) -> tuple[Path, Path]:
    references, predictions = split_one_human(annotations, images)
    (directory / "refs.json").write_text(json.dumps(references))
    (directory / "preds.json").write_text(json.dumps(predictions))
    return directory / "refs.json", directory / "preds.json"


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, Path]:
    """coco-mini val: 79 images, one human caption each as prediction, the other four as references."""
    return write_split(tmp_path_factory.mktemp("mini"), COCO_MINI / "annotations" / "captions_val2017.json")


def run_cocoevalcap(refs: Path, preds: Path, monkeypatch):
    """pycocoevalcap's own pipeline on pycocotools COCO objects (SPICE stubbed out: its jars are absent)."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO(str(refs))
    results = coco.loadRes(str(preds))
    evaluator = coco_eval.COCOEvalCap(coco, results)
    evaluator.params["image_id"] = results.getImgIds()
    evaluator.evaluate()
    return evaluator


@pytest.mark.slow
def test_cli_equals_cocoevalcap_on_coco_val2017(tmp_path, monkeypatch):
    """The first 1,000 val2017 images (by id): all 5,000 take ~50 s per scorer on one core and test nothing more."""
    refs, preds = write_split(tmp_path, COCO_VAL_CAPTIONS, images=1000)
    out, per_image = tmp_path / "scores.json", tmp_path / "per_image.json"
    cli = {}
    # The CLI runs in its own process while COCOEvalCap runs here.
    thread = threading.Thread(target=lambda: cli.setdefault("result", run_cli(
        "evaluate", "--references", refs, "--predictions", preds, "--out", out, "--per-image", per_image)))
    thread.start()
    expected = run_cocoevalcap(refs, preds, monkeypatch)
    thread.join()

    scores = json.loads(out.read_text())
    assert scores["num_images"] == 1000
    for ours, theirs in COCOEVALCAP_NAMES.items():
        assert scores["scores"][ours] == 100 * expected.eval[theirs], ours
    assert scores["scores"]["SPICE"] is None and "stanford-corenlp-3.6.0" in scores["unavailable"]["SPICE"]
    images = json.loads(per_image.read_text())
    assert [img["image_id"] for img in images] == [img["id"] for img in json.loads(refs.read_text())["images"]]
    for image in images:
        for ours, theirs in COCOEVALCAP_NAMES.items():
            assert image[ours] == 100 * expected.imgToEval[image["image_id"]][theirs], (image, ours)
    table = cli["result"].stdout
    assert f"{100 * expected.eval['CIDEr']:.2f}" in table and "SPICE unavailable" in table


def test_meteor_runs_once_per_process_and_a_forked_child_leaves_it_alone(mini):
    """METEOR's Java process starts with the first evaluation (a fresh process, whose scores equal pycocoevalcap's:
    test_cli_equals_cocoevalcap_on_coco_val2017) and serves the next ones with the same scores; a forked child that
    drops its inherited copy does not stop the parent's process."""
    import smallcap.evaluation as evaluation

    refs, preds = mini
    first = evaluate(refs, preds, metrics=["METEOR"])
    process = evaluation._meteor_process.meteor_p
    second = evaluate(refs, preds, metrics=["METEOR"])
    assert evaluation._meteor_process.meteor_p is process and second == first
    child = os.fork()
    if child == 0:  # the child drops the parent's scorer (running its __del__), then leaves without cleanup
        evaluation._meteor_process = None
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    assert process.poll() is None
    assert evaluate(refs, preds, metrics=["METEOR"]) == first
    evaluation._meteor_process = None  # the parent's own drop stops it
    assert process.wait(timeout=10) is not None


@pytest.mark.slow
def test_karpathy_split_file_gives_the_coco_format_scores(tmp_path, mini):
    refs, preds = mini
    coco = json.loads(refs.read_text())
    train, _ = split_one_human(COCO_MINI / "annotations" / "captions_train2017.json")
    images = []
    for split, data in (("test", coco), ("train", train)):
        for img in data["images"]:
            sentences = [{"raw": a["caption"], "tokens": a["caption"].lower().split()}
                         for a in data["annotations"] if a["image_id"] == img["id"]]
            images.append({"filename": img["file_name"], "cocoid": img["id"], "split": split, "sentences": sentences})
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))

    result = run_cli("evaluate", "--references", karpathy, "--split", "test", "--predictions", preds,
                     "--out", tmp_path / "s.json", *FAST)
    assert json.loads((tmp_path / "s.json").read_text())["scores"] == evaluate(refs, preds, metrics=FAST[1].split(","))["scores"]
    assert "CIDEr" in result.stdout

    train_pred = tmp_path / "train_pred.json"
    train_pred.write_text(json.dumps([{"image_id": train["images"][0]["id"], "caption": "a cat"}]))
    failed = run_cli("evaluate", "--references", karpathy, "--split", "test", "--predictions", train_pred, check=False)
    assert failed.returncode == 2 and str(train["images"][0]["id"]) in failed.stderr and "split" in failed.stderr
    failed = run_cli("evaluate", "--references", karpathy, "--split", "testing", "--predictions", preds, check=False)
    assert failed.returncode == 2 and "no image has split 'testing'" in failed.stderr and "test, train" in failed.stderr


def test_nocaps_domains_are_scored_as_separate_subsets(mini):
    refs, preds = mini
    references = json.loads(refs.read_text())
    domains = ("in-domain", "near-domain", "out-domain")
    nocaps = {**references, "images": [{**img, "domain": domains[n % 3]} for n, img in enumerate(references["images"])]}
    result = evaluate(nocaps, preds, metrics=["BLEU", "CIDEr"])

    assert result["scores"] == evaluate(references, preds, metrics=["BLEU", "CIDEr"])["scores"]
    assert list(result["domains"]) == list(domains)
    predictions = json.loads(preds.read_text())
    for domain in domains:
        ids = {img["id"] for img in nocaps["images"] if img["domain"] == domain}
        alone = evaluate(references, [p for p in predictions if p["image_id"] in ids], metrics=["BLEU", "CIDEr"])
        assert result["domains"][domain] == {"num_images": len(ids), "scores": alone["scores"]}
    # CIDEr's document frequencies come from each subset, so a domain score is not a mean of image scores.
    assert result["domains"]["in-domain"]["scores"]["CIDEr"] != result["scores"]["CIDEr"]


ODD = {0: "A man\u2028in a kitchen\rmaking pizzas.", 1: "A café with crème brûlée, “quoted” — 日本 😀",
       2: "a dog\x0bon a\x0cbed", 4: "", 7: "   "}


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, mini):
    """One CLI run (METEOR included: it is Java too) on coco-mini predictions with line-break characters,
    non-ASCII text and empty captions, and one on the same text with the line breaks already spaces."""
    refs, preds = mini
    tmp = tmp_path_factory.mktemp("odd")
    predictions = json.loads(preds.read_text())
    for n, caption in ODD.items():
        predictions[n]["caption"] = caption
    (tmp / "odd.json").write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
    spaced = [{**p, "caption": p["caption"].translate({ord(c): " " for c in "\u2028\r\x0b\x0c"})} for p in predictions]
    (tmp / "spaced.json").write_text(json.dumps(spaced))
    result = run_cli("evaluate", "--references", refs, "--predictions", tmp / "odd.json",
                     "--per-image", tmp / "odd_images.json", "--metrics", "BLEU,METEOR,ROUGE-L,CIDEr")
    run_cli("evaluate", "--references", refs, "--predictions", tmp / "spaced.json",
            "--per-image", tmp / "spaced_images.json", "--metrics", "BLEU,ROUGE-L,CIDEr")
    return (predictions, result, json.loads((tmp / "odd_images.json").read_text(encoding="utf-8")),
            json.loads((tmp / "spaced_images.json").read_text()))


@pytest.mark.slow
def test_line_breaks_and_non_ascii_text_keep_captions_on_their_images(odd_run):
    _, result, odd_images, spaced_images = odd_run
    assert "warning: 2 predicted captions contained line-break characters" in result.stderr
    scores = ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr")
    assert [[img[k] for k in scores] for img in odd_images] == [[img[k] for k in scores] for img in spaced_images]
    assert odd_images[1]["caption"] == ODD[1] and odd_images[1]["CIDEr"] > 0
    # The captions after the odd ones still match their own references (they are human captions).
    assert all(img["CIDEr"] > 0 and img["METEOR"] > 5 for img in odd_images[8:12])


@pytest.mark.slow
def test_empty_captions_are_counted_and_scored_as_empty(odd_run):
    predictions, result, images, _ = odd_run
    ids = f"{predictions[4]['image_id']}, {predictions[7]['image_id']}"
    assert f"warning: 2 predictions have an empty caption (image ids {ids}); scored as empty" in result.stderr
    for n in (4, 7):
        assert images[n]["CIDEr"] == 0 and images[n]["METEOR"] == 0 and images[n]["ROUGE-L"] == 0
    assert images[5]["CIDEr"] > 0


def test_missing_java_is_a_clear_error(tmp_path, mini):
    refs, preds = mini
    result = run_cli("evaluate", "--references", refs, "--predictions", preds, check=False,
                     env={"PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "`java` was not found on PATH" in result.stderr and "apt-get install default-jre-headless" in result.stderr


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


LATIN1 = '[{"image_id": 397133, "caption": "A café"}]'.encode("latin-1")


@pytest.mark.parametrize("predictions, message", [
    ([{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}, {"image_id": 397133, "caption": "c"}],
     "2 of 3 predicted image ids are not in REFS (e.g. 1, 2)"),
    ([{"image_id": 397133, "caption": "a"}, {"image_id": 397133, "caption": "b"}],
     "1 duplicate image ids (e.g. 397133); give one caption per image"),
    ({"397133": "a man"}, "PREDS: expected a JSON list of {\"image_id\": int or str, \"caption\": str}; got a JSON object"),
    ([{"image_id": 397133, "caption": "a"}, {"image_id": 37777, "text": "b"}],
     "PREDS: item 1 is {\"image_id\": 37777, \"text\": \"b\"}; expected a JSON list of"),
    (["a man in a kitchen"], "PREDS: item 0 is \"a man in a kitchen\"; expected a JSON list of"),
    ([{"image_id": 3.5, "caption": "a"}], "PREDS: item 0: image id 3.5 is not an int or a string"),
    ([], "PREDS: no predictions"),
    (LATIN1, f"PREDS is not UTF-8 text (byte 0xe9 at offset {LATIN1.index(0xe9)}); re-save it as UTF-8 JSON"),
    (b"[{\"image_id\": 1,", "PREDS is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
])
def test_bad_predictions_are_clear_errors(tmp_path, mini, predictions, message):
    refs, _ = mini
    preds = write(tmp_path / "bad_preds.json", predictions)
    result = run_cli("evaluate", "--references", refs, "--predictions", preds, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("smallcap evaluate: error: ")
    assert message.replace("REFS", str(refs)).replace("PREDS", str(preds)) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("references, extra, message", [
    ([{"image_id": 397133, "caption": "a"}], (),
     "is not a references file: expected COCO caption annotations {\"images\": [{\"id\": ...}], \"annotations\": "
     "[{\"image_id\": ..., \"caption\": \"...\"}]}, a Karpathy split file {\"images\": [{\"cocoid\" or \"imgid\": "
     "..., \"split\": \"test\", \"sentences\": [{\"raw\": \"...\"}]}]} or MSR-VTT annotations {\"videos\": "
     "[{\"video_id\": ..., \"split\": \"test\"}], \"sentences\": [{\"video_id\": ..., \"caption\": \"...\"}]}; "
     "got a JSON list (this looks like a "
     "predictions file; are --references and --predictions swapped?)"),
    ({"images": [{"id": 397133}], "annotations": [{"image_id": 397133, "bbox": [0, 0, 1, 1], "category_id": 1}]},
     (), "annotations[0] is not {\"image_id\", \"caption\": str} (object annotations, not captions?)"),
    ({"info": {}, "licenses": []}, (), "got a JSON object with keys 'info', 'licenses'"),
    ({"images": [{"id": 397133}], "annotations": [{"image_id": 397133, "caption": "a man"}]}, ("--split", "test"),
     "--split applies to Karpathy and MSR-VTT files; this is COCO-format annotations"),
    ({"images": [{"id": 397133}], "annotations": []}, (),
     "1 predicted images have no reference captions in REFS (e.g. 397133)"),
])
def test_bad_references_are_clear_errors(tmp_path, references, extra, message):
    refs = write(tmp_path / "bad_refs.json", references)
    preds = write(tmp_path / "preds.json", [{"image_id": 397133, "caption": "a man in a kitchen"}])
    result = run_cli("evaluate", "--references", refs, "--predictions", preds, *extra, check=False)
    assert result.returncode == 2, result.stderr
    assert message.replace("REFS", str(refs)) in result.stderr and "Traceback" not in result.stderr


def test_unknown_metric_and_missing_file_are_clear_errors(tmp_path, mini):
    refs, preds = mini
    result = run_cli("evaluate", "--references", refs, "--predictions", preds, "--metrics", "BLEU,WER", check=False)
    assert result.returncode == 2 and "unknown metric 'WER'; choose from BLEU, METEOR, ROUGE-L, CIDEr, SPICE" in result.stderr
    result = run_cli("evaluate", "--references", tmp_path / "nope.json", "--predictions", preds, check=False)
    assert result.returncode == 2 and f"references file {tmp_path / 'nope.json'} does not exist" in result.stderr
