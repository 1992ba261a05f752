"""Caption-file readers: every format, format detection and overrides, and the errors for bad files."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import COCO_MINI, COCO_VAL_CAPTIONS, run_cli

from smallcap.data import CaptionRecord, clean_caption, dataset_images, image_id_key, read_caption_files, read_captions
from smallcap.errors import SmallCapError
from smallcap.evaluation import load_references
from smallcap.retrieval.build import read_datastore_captions
from smallcap.training_data import read_training_samples

COCO_TRAIN = COCO_MINI / "annotations" / "captions_train2017.json"


def coco_annotations(path=COCO_TRAIN):
    return json.loads(path.read_text())


def write_karpathy(path, with_cocoid=True):
    """A Karpathy-format split file made from the real coco-mini captions: one image per split."""
    data = coco_annotations()
    files = {image["id"]: image["file_name"] for image in data["images"]}
    by_image: dict[int, list[str]] = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    images = []
    for position, (image_id, captions) in enumerate(sorted(by_image.items())[:4]):
        image = {"filepath": "train2014", "filename": files[image_id], "imgid": position,
                 "split": ["train", "restval", "val", "test"][position],
                 "sentences": [{"raw": caption, "tokens": caption.lower().split()} for caption in captions]}
        if with_cocoid:
            image["cocoid"] = image_id
        else:
            del image["filepath"]
        images.append(image)
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return images


def test_clean_caption_collapses_whitespace():
    assert clean_caption("  Two pizza pies sitting atop a stove\n.\n") == "Two pizza pies sitting atop a stove ."


def test_coco_annotations_real_file():
    records = list(read_captions(COCO_TRAIN))
    data = coco_annotations()
    assert len(records) == len(data["annotations"])
    first, annotation = records[0], data["annotations"][0]
    image = next(image for image in data["images"] if image["id"] == annotation["image_id"])
    assert first == CaptionRecord(clean_caption(annotation["caption"]), annotation["image_id"], str(COCO_TRAIN),
                                  image["file_name"], None)
    assert all(isinstance(record.image_id, int) for record in records)


def test_coco_val_captions_whitespace_is_cleaned():
    records = list(read_captions(COCO_VAL_CAPTIONS))
    assert len(records) == 25014
    assert not any("\n" in record.caption or record.caption != record.caption.strip() for record in records)


def test_text_one_caption_per_line(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_text("A man riding a horse.\n\n  a  dog on a couch \n")
    records = list(read_captions(path))
    assert [(r.caption, r.image_id) for r in records] == [("A man riding a horse.", 1), ("a dog on a couch", 3)]


def test_text_binary_file_is_an_error(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes(b"a fine caption\n\xff\xfe\x00junk\n")
    with pytest.raises(SmallCapError, match=r"caps.txt:2: not valid UTF-8.*one caption per line"):
        list(read_captions(path))


def test_json_list_of_strings_and_of_objects(tmp_path):
    strings = tmp_path / "list.json"
    strings.write_text(json.dumps(["a cat", "a dog"]))
    assert [(r.caption, r.image_id) for r in read_captions(strings)] == [("a cat", 0), ("a dog", 1)]
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps([{"text": "a cat", "image_id": 7, "image": "7.jpg", "split": "train"}]))
    assert list(read_captions(objects, column="text")) == [CaptionRecord("a cat", 7, str(objects), "7.jpg", "train")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["a cat", 3]))
    with pytest.raises(SmallCapError, match=r"bad.json: item 1 is a int; expected a JSON list of caption strings"):
        list(read_captions(bad))


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n"a cat",\n"a dog"\n')
    with pytest.raises(SmallCapError, match=r"caption file .*broken.json is not valid JSON: .* at line 4 column 1"):
        list(read_captions(path))


@pytest.mark.parametrize("with_cocoid", [True, False], ids=["coco", "flickr"])
def test_karpathy_split_file(tmp_path, with_cocoid):
    path = tmp_path / "dataset_coco.json"
    images = write_karpathy(path, with_cocoid)
    records = list(read_captions(path))
    assert len(records) == sum(len(image["sentences"]) for image in images)
    assert {r.split for r in records} == {"train", "restval", "val", "test"}
    first = images[0]
    expected_id = first["cocoid"] if with_cocoid else first["imgid"]
    expected_file = f"train2014/{first['filename']}" if with_cocoid else first["filename"]
    assert records[0] == CaptionRecord(clean_caption(first["sentences"][0]["raw"]), expected_id, str(path),
                                       expected_file, "train")
    kept = list(read_captions(path, splits=("train", "restval")))
    assert {r.split for r in kept} == {"train", "restval"}
    assert len(kept) == len(images[0]["sentences"]) + len(images[1]["sentences"])


def test_msrvtt_annotations(tmp_path):
    path = tmp_path / "train_val_videodatainfo.json"
    path.write_text(json.dumps({
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video9", "split": "test"}],
        "sentences": [{"video_id": "video0", "caption": "a man is singing", "sen_id": 0},
                      {"video_id": "video9", "caption": "a cartoon plays", "sen_id": 1}]}))
    records = list(read_captions(path))
    assert records[0] == CaptionRecord("a man is singing", "video0", str(path), None, "train")
    assert [r.image_id for r in read_captions(path, splits=["train"])] == ["video0"]


def test_jsonl_with_columns_and_errors(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"text": "a cat", "img": "c1", "file_name": "c1.jpg"}\n\n{"text": "a dog", "img": "d1"}\n')
    records = list(read_captions(path, column="text", id_column="img"))
    assert records == [CaptionRecord("a cat", "c1", str(path), "c1.jpg"), CaptionRecord("a dog", "d1", str(path))]
    # Without an id column: the image file's stem, else the line number.
    assert [r.image_id for r in read_captions(path, column="text")] == ["c1", 3]
    with pytest.raises(SmallCapError, match=r"caps.jsonl:1: no 'caption' field \(fields: text, img, file_name\)"):
        list(read_captions(path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "fine"}\n{"caption": "fine"}\n{"caption": broken}\n')
    with pytest.raises(SmallCapError, match=r"bad.jsonl:3: not JSON .*one JSON object per line"):
        list(read_captions(bad))
    listed = tmp_path / "list.jsonl"
    listed.write_text('["a cat"]\n')
    with pytest.raises(SmallCapError, match=r"list.jsonl:1: a JSON list, not an object"):
        list(read_captions(listed))


def test_csv_and_tsv(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text('image_id,caption,image\n5,"a cat, on a mat",5.jpg\n6,a dog,6.jpg\n')
    assert list(read_captions(path)) == [CaptionRecord("a cat, on a mat", "5", str(path), "5.jpg"),
                                         CaptionRecord("a dog", "6", str(path), "6.jpg")]
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("sentence\tvid\na cat\tv1\n")
    assert list(read_captions(tsv, column="sentence", id_column="vid")) == [CaptionRecord("a cat", "v1", str(tsv))]
    with pytest.raises(SmallCapError, match=r"caps.csv:1: no 'text' column in the header \(columns: image_id, caption, "
                                            r"image\); expected a CSV file whose header has a 'text' column"):
        list(read_captions(path, column="text"))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("caption\na cat\na dog,extra\n")
    with pytest.raises(SmallCapError, match=r"ragged.csv:3: 2 cells for 1 columns"):
        list(read_captions(ragged))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install smallcap[parquet])")
    import pyarrow.parquet as pq

    path = tmp_path / "caps.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a dog"], "image_id": [1, 2], "split": ["train", "val"]}), path)
    assert list(read_captions(path)) == [CaptionRecord("a cat", 1, str(path), None, "train"),
                                         CaptionRecord("a dog", 2, str(path), None, "val")]
    with pytest.raises(SmallCapError, match=r"caps.parquet: no 'text' column \(columns: caption, image_id, split\)"):
        list(read_captions(path, column="text"))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(SmallCapError, match=r"garbage.parquet: not readable as Parquet"):
        list(read_captions(garbage))


def test_format_override_and_detection_errors(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text('{"caption": "a cat"}\n')
    assert [r.caption for r in read_captions(path)] == ['{"caption": "a cat"}']  # detected as text
    assert [r.caption for r in read_captions(path, format="jsonl")] == ["a cat"]
    coco_as_karpathy = tmp_path / "coco.json"
    coco_as_karpathy.write_text(json.dumps(coco_annotations()))
    with pytest.raises(SmallCapError, match=r"coco.json: no 'images' list|image 0 has no 'sentences'"):
        list(read_captions(coco_as_karpathy, format="karpathy"))
    with pytest.raises(SmallCapError, match="unknown caption format 'yaml'"):
        list(read_captions(path, format="yaml"))
    with pytest.raises(SmallCapError, match="missing.txt does not exist"):
        list(read_captions(tmp_path / "missing.txt"))
    unknown = tmp_path / "dict.json"
    unknown.write_text(json.dumps({"something": 1}))
    with pytest.raises(SmallCapError, match="dict.json: a JSON dict of an unknown layout"):
        list(read_captions(unknown))


def test_read_several_files_in_order(tmp_path):
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text("first\n")
    two.write_text("second\n")
    records = read_caption_files([one, two])
    assert [(r.caption, r.source) for r in records] == [("first", str(one)), ("second", str(two))]


# ------------------------------------------------------------------ every entry point reads the same files alike

SPLIT_OF = ("train", "restval", "train", "test", "test", "val")  # of the six images, in id order


def _truth():
    """Six real coco-mini val images: id, file name, split, raw captions (with COCO's stray whitespace) and
    Karpathy-style tokens (lower case, punctuation dropped)."""
    data = json.loads((COCO_MINI / "annotations" / "captions_val2017.json").read_text())
    chosen = sorted(data["images"], key=lambda image: image["id"])[:6]
    truth = []
    for image, split in zip(chosen, SPLIT_OF):
        raws = [a["caption"] for a in data["annotations"] if a["image_id"] == image["id"]]
        tokens = ["".join(c if c.isalnum() or c.isspace() else " " for c in raw.lower()).split() for raw in raws]
        truth.append({"id": image["id"], "file": image["file_name"], "split": split, "raws": raws, "tokens": tokens})
    return truth


def _write_inputs(root, truth):
    """The same captions as a Karpathy split file, COCO annotations (in `annotations/`, images in the sibling
    `val2017/`), MSR-VTT annotations (media `video<id>.jpg`), a JSONL table (ids from the image file's stem,
    000000397133.jpg -> 397133) and a CSV table (an image_id column)."""
    (root / "annotations").mkdir()
    (root / "val2017").symlink_to(COCO_MINI / "val2017")
    (root / "videos").mkdir()
    files = {"karpathy": root / "dataset_coco.json", "coco": root / "annotations" / "captions_val2017.json",
             "msrvtt": root / "videodatainfo.json", "jsonl": root / "captions.jsonl", "csv": root / "captions.csv"}
    files["karpathy"].write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2017", "filename": t["file"], "cocoid": t["id"], "split": t["split"],
         "sentences": [{"raw": raw, "tokens": tokens} for raw, tokens in zip(t["raws"], t["tokens"])]}
        for t in truth]}))
    files["coco"].write_text(json.dumps({
        "images": [{"id": t["id"], "file_name": t["file"]} for t in truth],
        "annotations": [{"image_id": t["id"], "id": n, "caption": raw} for t in truth for n, raw in enumerate(t["raws"])]}))
    files["msrvtt"].write_text(json.dumps({
        "videos": [{"video_id": f"video{t['id']}", "split": t["split"]} for t in truth],
        "sentences": [{"video_id": f"video{t['id']}", "caption": raw} for t in truth for raw in t["raws"]]}))
    for t in truth:
        (root / "videos" / f"video{t['id']}.jpg").symlink_to(COCO_MINI / "val2017" / t["file"])
    files["jsonl"].write_text("".join(json.dumps({"image": f"val2017/{t['file']}", "caption": raw, "split": t["split"]})
                                      + "\n" for t in truth for raw in t["raws"]))
    with open(files["csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "caption", "image", "split"])
        writer.writerows([f"{t['id']:012d}", raw, f"val2017/{t['file']}", t["split"]] for t in truth for raw in t["raws"])
    return files


@pytest.mark.parametrize("kind", ["karpathy", "coco", "msrvtt", "jsonl", "csv"])
def test_every_entry_point_reads_the_same_files_alike(tmp_path, kind):
    """Training samples, predict's images, evaluation's references and the datastore build's captions, read from
    the same file: the same ids under the one string rule (`image_id_key`), and the text each use documents
    (smallcap.data): training = Karpathy's tokens joined by spaces, else the raw caption whitespace-collapsed;
    the datastore (by default) = the same, as the reference indexes Karpathy files; evaluation = raw,
    whitespace-collapsed."""
    truth = _truth()
    path = _write_inputs(tmp_path, truth)[kind]
    key = (lambda t: f"video{t['id']}") if kind == "msrvtt" else (lambda t: image_id_key(t["id"]))
    has_splits = kind != "coco"
    in_split = lambda *splits: [t for t in truth if not has_splits or t["split"] in splits]  # noqa: E731
    raw = {key(t): [clean_caption(r) for r in t["raws"]] for t in truth}
    tokens = {key(t): [" ".join(tok) for tok in t["tokens"]] for t in truth}

    # Datastore build: train + restval, the reference's tokens by default, the sentences as written on request.
    records, info = read_datastore_captions([path])
    assert info[0]["records"] == len(records)
    wanted_tokens = tokens if kind == "karpathy" else raw
    assert _by_id(records) == {key(t): wanted_tokens[key(t)] for t in in_split("train", "restval")}
    assert _by_id(read_datastore_captions([path], text="raw")[0]) == {key(t): raw[key(t)]
                                                                      for t in in_split("train", "restval")}

    # Predict: the images of the test split (all of a COCO file), found under the default image root.
    images_dir = tmp_path / "videos" if kind == "msrvtt" else None
    predicted = dataset_images(path, "test" if has_splits else None, images_dir=images_dir)
    expected = in_split("test")
    assert [image_id_key(i) for i, _ in predicted] == [key(t) for t in expected]
    for (_, file), t in zip(predicted, expected):
        assert file.resolve() == (COCO_MINI / "val2017" / t["file"]).resolve()

    # Evaluation: the raw references of the test split (reference files only).
    if kind in ("karpathy", "coco", "msrvtt"):
        references = load_references(path, "test" if has_splits else None)
        assert {image_id_key(i): refs for i, refs in references.captions.items()} == \
            {key(t): raw[key(t)] for t in expected}
    else:
        with pytest.raises(SmallCapError, match="not valid JSON"):
            load_references(path)

    # Training: train + restval (a COCO file: all of it, as split "val"), Karpathy's tokens, image files found.
    if kind == "msrvtt":
        with pytest.raises(SmallCapError, match="msrvtt captions cannot be trained on"):
            read_training_samples(path)
        return
    samples = read_training_samples(path, split=None if has_splits else "val")
    train_text = tokens if kind == "karpathy" else raw
    expected = in_split("train", "restval")
    by_id: dict[str, list[str]] = {}
    for sample in samples:
        by_id.setdefault(sample.image_id, []).append(sample.caption)
    assert by_id == {key(t): train_text[key(t)] for t in expected}
    files = {key(t): t["file"] for t in truth}
    assert all(s.image_path.resolve() == (COCO_MINI / "val2017" / files[s.image_id]).resolve() for s in samples)


def _by_id(records) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for record in records:
        grouped.setdefault(image_id_key(record.image_id), []).append(record.caption)
    return grouped


def test_image_id_rule():
    assert image_id_key("000000000139") == "139" == image_id_key(139)  # a file stem is the COCO id it spells
    assert image_id_key("video7010") == "video7010"
    with pytest.raises(SmallCapError, match="image id 3.5 is not an int or a string"):
        image_id_key(3.5)


def test_training_table_rows_must_name_their_image(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"caption": "a cat", "image_id": 1}\n{"caption": "a dog"}\n')
    with pytest.raises(SmallCapError, match=r"captions.jsonl:2: no 'image_id' field and no image file"):
        read_training_samples(path)
    path.write_text('{"caption": "a cat", "image_id": 1}\n{"caption": "  ", "image_id": 2}\n')
    with pytest.raises(SmallCapError, match=r"captions.jsonl:2: empty 'caption'; expected one JSON object per line"):
        read_training_samples(path)
    text = tmp_path / "captions.txt"
    text.write_text("a cat\n")
    with pytest.raises(SmallCapError, match="text captions cannot be trained on"):
        read_training_samples(text)


def _write_table(path, rows: list[dict]) -> None:
    """Write `rows` as the table its suffix says: Parquet, TSV or CSV."""
    if path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_an_image_list_is_read_alike_by_predict_and_the_ray_planner(tmp_path, suffix):
    """Local predict (`dataset_images`) and the Ray job's planner decide what a table is by the one rule
    (`read_image_list`): a table of paths without a caption column is what to caption, with the same ids and files
    for both; a table with a caption column is an annotation file, whose images of the split both caption."""
    from smallcap.scale.sources import plan_shards

    def planned(table, **options):
        return [item for shard in plan_shards([str(table)], **options) for item in shard.items]

    files = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:3]
    table = tmp_path / f"list{suffix}"
    _write_table(table, [{"path": str(files[0]), "key": "first"}, {"path": str(files[1]), "key": ""},
                         {"path": files[2].name, "key": "third"}])
    expected = [("first", files[0]), (int(files[1].stem), files[1]), ("third", files[2])]
    # Relative paths are under --images-dir (here the images' folder), absolute ones as they are.
    assert dataset_images(table, images_dir=files[2].parent) == expected
    assert planned(table, images_dir=str(files[2].parent)) == [(image_id, str(file)) for image_id, file in expected]
    with pytest.raises(SmallCapError, match="image files not found"):
        dataset_images(table)  # the relative path is not beside the table

    # With a caption column it holds annotations: each image once (not once per caption), in the split asked for.
    annotated = tmp_path / f"annotated{suffix}"
    _write_table(annotated, [{"image": file.name, "caption": f"caption {n} of {file.stem}", "split": split}
                             for file, split in zip(files, ("test", "train", "test")) for n in range(2)])
    expected = [(files[0].stem, files[0]), (files[2].stem, files[2])]
    assert dataset_images(annotated, "test", images_dir=files[0].parent) == expected
    assert planned(annotated, split="test", images_dir=str(files[0].parent)) == \
        [(image_id, str(file)) for image_id, file in expected]

    twice = tmp_path / f"twice{suffix}"
    _write_table(twice, [{"path": str(files[0]), "key": "same"}, {"path": str(files[1]), "key": "same"}])
    for read in (dataset_images, planned):
        with pytest.raises(SmallCapError, match=r"twice.*: image id 'same' is given twice \(first at "):
            read(twice)
    if suffix == ".csv":  # and the way a user gives one to predict
        out = tmp_path / "preds.json"
        run_cli("predict", table, "--images-dir", files[2].parent, "--model", "mini", "--no-retrieval",
                "--num-beams", "1", "--max-new-tokens", "5", "--out", out)
        preds = json.loads(out.read_text())
        assert [row["image_id"] for row in preds] == ["first", int(files[1].stem), "third"]
        assert all(row["caption"] for row in preds)
    bad = tmp_path / f"bad{suffix}"
    if suffix != ".parquet":
        bad.write_text("name\nx.jpg\n")
        with pytest.raises(SmallCapError, match=r"no image path column \(expected one of path, image"):
            dataset_images(bad)
