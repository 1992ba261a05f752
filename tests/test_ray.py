"""Scale-out on Ray (`--engine ray`): real local Ray clusters, the bundled `mini` model, real COCO images.

Results are compared with the single-process path (`smallcap.prediction.predict`, `build_datastore`) on the
same images and captions; the fault tests kill real worker processes by pid while a job runs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest

from conftest import COCO_MINI

ray = pytest.importorskip("ray", reason="the Ray tests need the optional extra smallcap[ray]")

from smallcap.errors import SmallCapError  # noqa: E402
from smallcap.scale.predict import predict_on_ray, read_output_shard  # noqa: E402
from smallcap.scale.sources import expand_braces, plan_shards, read_shard  # noqa: E402

VAL = COCO_MINI / "val2017"
IMAGES = sorted(VAL.glob("*.jpg"))
OPTIONS = {"model": "mini", "datastores": ["mini-source"]}


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray cluster for this module's pipeline tests, shut down at the end."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def single_process_captions(images: list[Path] = IMAGES) -> dict[str, str]:
    """Captions of `images` (default: every coco-mini val image) by the single-process `predict`
    (file name -> caption)."""
    import torch

    from smallcap.captioner import Captioner
    from smallcap.prediction import predict

    torch.set_num_threads(1)
    captioner = Captioner.from_pretrained(**OPTIONS)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"smallcap-ray-local-{os.getpid()}.json"
    predict(captioner, [(path.name, path) for path in images], out, batch_size=16, progress=False)
    captions = {row["image_id"]: row["caption"] for row in json.loads(out.read_text())}
    out.unlink()
    return captions


@pytest.fixture(scope="module")
def local_captions() -> dict[str, str]:
    """`single_process_captions()`, computed once for the module."""
    return single_process_captions()


def write_webdataset(path: Path, images: list[Path]) -> None:
    """A WebDataset shard as img2dataset writes it: `{key}.jpg`, `{key}.txt`, `{key}.json` per sample."""
    with tarfile.open(path, "w") as tar:
        for image in images:
            key = f"img-{image.stem}"
            for suffix, data in ((".jpg", image.read_bytes()), (".txt", b"a caption"),
                                 (".json", json.dumps({"url": image.name}).encode())):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_brace_expansion():
    assert expand_braces("shards/{00000..00002}.tar") == [f"shards/0000{n}.tar" for n in range(3)]
    assert expand_braces("{a,b}/{1..2}.jpg") == ["a/1.jpg", "a/2.jpg", "b/1.jpg", "b/2.jpg"]
    assert expand_braces("plain{x}.jpg") == ["plain{x}.jpg"]


def test_plan_shards_reads_every_input_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for number in range(2):
        write_webdataset(tmp_path / f"{number:05d}.tar", IMAGES[number * 3:number * 3 + 3])
    pq.write_table(pa.table({"path": [p.name for p in IMAGES[6:9]], "key": ["a", "b", "c"]}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("image_path\n" + "".join(f"{p}\n" for p in IMAGES[9:11]))
    shards = plan_shards([str(tmp_path / "{00000..00001}.tar"), str(tmp_path / "t.parquet"), str(tmp_path / "t.csv"),
                          str(VAL / "0000000001*.jpg")], images_dir=None, shard_size=4)
    assert [s.name for s in shards[:2]] == ["tar-00000", "tar-00001"]
    tar_items = list(read_shard(shards[0]))
    assert [i.image_id for i in tar_items] == [f"img-{p.stem}" for p in IMAGES[:3]]
    assert tar_items[0].data == IMAGES[0].read_bytes()
    loose = [item for shard in shards[2:] for item in shard.items]
    assert loose[:3] == [("a", str(tmp_path / IMAGES[6].name)), ("b", str(tmp_path / IMAGES[7].name)),
                         ("c", str(tmp_path / IMAGES[8].name))]
    assert loose[3] == (int(IMAGES[9].stem), str(IMAGES[9]))
    assert all(len(shard.items) <= 4 for shard in shards[2:])
    with pytest.raises(SmallCapError, match="no files match"):
        plan_shards([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(SmallCapError, match="given twice"):
        plan_shards([str(IMAGES[0]), str(IMAGES[0])])
    (tmp_path / "bad.csv").write_text("name\nx.jpg\n")
    with pytest.raises(SmallCapError, match="no image path column"):
        plan_shards([str(tmp_path / "bad.csv")])
    # A table with a caption column is an annotation file, as for local predict: its images are looked up by id.
    (tmp_path / "captions.csv").write_text("caption\na dog\n")
    with pytest.raises(SmallCapError, match="no file for image 0"):
        plan_shards([str(tmp_path / "captions.csv")])


def test_worker_pool_options_are_checked_before_any_work(tmp_path):
    """Both Ray jobs refuse an empty actor pool or a negative GPU share, with the option named, before any work
    (no cluster is needed)."""
    from smallcap.scale.datastore import RayShardEmbedder

    with pytest.raises(SmallCapError, match=r"--num-workers must be at least 1 \(got 0\)"):
        predict_on_ray([], tmp_path / "preds.json", OPTIONS, num_workers=0)
    with pytest.raises(SmallCapError, match=r"--gpus-per-worker must not be negative \(got -1"):
        RayShardEmbedder("mini-clip", gpus_per_worker=-1)
    assert not (tmp_path / "preds.json.shards").exists()


@pytest.mark.slow
def test_ray_predict_matches_local_and_resumes(cluster, local_captions, tmp_path):
    """Tars (brace notation) and a folder through the actor pool: the same captions as single-process predict,
    one file per shard; an unreadable image is reported and left out, and its shard is redone by a rerun, as is
    a missing shard, the others are kept; other settings in the same folder are refused."""
    for number in range(2):
        write_webdataset(tmp_path / f"{number:05d}.tar", IMAGES[number * 5:number * 5 + 5])
    folder = tmp_path / "folder"
    folder.mkdir()
    for image in IMAGES[10:22]:
        (folder / image.name).symlink_to(image)
    (folder / "broken.jpg").write_bytes(b"not a JPEG")  # sorts last: in the last shard
    shards = plan_shards([str(tmp_path / "{00000..00001}.tar"), str(folder)], shard_size=5)
    assert [s.name for s in shards] == ["tar-00000", "tar-00001", "part-00002", "part-00003", "part-00004"]
    out = tmp_path / "preds.json"
    report = predict_on_ray(shards, out, OPTIONS, num_workers=1, batch_size=4, progress=False)
    assert (report.shards_done, report.shards_resumed, report.captioned) == (5, 0, 22)
    assert list(report.failed) == ["broken"] and "broken.jpg" in report.failed["broken"]
    rows = json.loads(out.read_text())
    expected_ids = [f"img-{p.stem}" for p in IMAGES[:10]] + [int(p.stem) for p in IMAGES[10:22]]
    assert [row["image_id"] for row in rows] == expected_ids
    assert [row["caption"] for row in rows] == [local_captions[p.name] for p in IMAGES[:22]]
    shard_dir = tmp_path / "preds.json.shards" / "shards"
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted(f"{s.name}.jsonl" for s in shards)
    first = read_output_shard(shard_dir / "tar-00000.jsonl")
    assert len(first) == 5 and all(len(row["retrieved"]) == 4 for row in first)
    assert read_output_shard(shard_dir / "part-00004.jsonl") is None  # holds an error: not finished

    (shard_dir / "part-00003.jsonl").unlink()
    kept = (shard_dir / "tar-00000.jsonl").stat().st_mtime_ns
    again = predict_on_ray(shards, out, OPTIONS, num_workers=1, batch_size=4, progress=False)
    assert (again.shards_done, again.shards_resumed, list(again.failed)) == (2, 3, ["broken"])
    assert (shard_dir / "tar-00000.jsonl").stat().st_mtime_ns == kept
    assert json.loads(out.read_text()) == rows

    with pytest.raises(SmallCapError, match="other inputs or settings"):
        predict_on_ray(shards, out, {**OPTIONS, "k": 2}, progress=False)


def caption_worker_processes():
    """(pid, parent pid, command line) of each Ray Data captioning actor process on this machine (its process
    title names the actor class, and the method it is running)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if command.startswith(b"ray::") and b"CaptionWorker" in command:
                yield int(entry.name), ppid, command


def caption_worker_pids(parent: int | None = None) -> list[int]:
    """Processes of Ray Data captioning actors on this machine, optionally only the children of `parent` (a
    node's raylet)."""
    return [pid for pid, ppid, _ in caption_worker_processes() if parent in (None, ppid)]


@pytest.mark.slow
def test_killed_captioning_actor_is_redone_exactly_once(cluster, local_captions, tmp_path):
    """SIGKILL the captioning actor's process once it has written some shards: Ray Data restarts it and redoes
    its blocks; the merged output equals the uninterrupted single-process run, every image once."""
    shards = plan_shards([str(VAL)], shard_size=6)
    out = tmp_path / "preds.json"
    shard_dir = tmp_path / "preds.json.shards" / "shards"
    outcome: dict = {}

    def job():
        try:
            outcome["report"] = predict_on_ray(shards, out, OPTIONS, num_workers=1, batch_size=3, progress=False)
        except BaseException as error:  # surfaced by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=job)
    thread.start()
    killed, done_at_kill, deadline = None, 0, time.monotonic() + 240
    while thread.is_alive() and killed is None and time.monotonic() < deadline:
        done = len(list(shard_dir.glob("*.jsonl"))) if shard_dir.is_dir() else 0
        pids = caption_worker_pids()
        if done >= 1 and pids:
            killed, done_at_kill = pids[0], done
            os.kill(killed, signal.SIGKILL)
            killed_at = time.time()
        time.sleep(0.2)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert "error" not in outcome, outcome.get("error")
    assert killed is not None and done_at_kill < len(shards), "the actor was not killed while the job ran"
    # The killed process cannot write: shards finished after the kill were captioned by a replacement actor.
    # (Watching /proc for the replacement's pid missed it now and then: it can start and finish between polls.)
    written_after = [p for p in shard_dir.glob("*.jsonl") if p.stat().st_mtime > killed_at]
    assert written_after, "no captioning actor finished a shard after the kill"
    rows = json.loads(out.read_text())
    assert [row["image_id"] for row in rows] == [int(p.stem) for p in IMAGES]
    assert [row["caption"] for row in rows] == [local_captions[p.name] for p in IMAGES]
    written = [row["image_id"] for path in sorted(shard_dir.iterdir()) for row in read_output_shard(path)]
    assert sorted(written) == sorted(int(p.stem) for p in IMAGES)  # no duplicates, none missing


def coco_caption_subset(path: Path, count: int) -> Path:
    """The first `count` of the 25k COCO val captions (a subset, to keep CI time down) as a COCO annotation
    file at `path`."""
    from conftest import COCO_VAL_CAPTIONS

    coco = json.loads(COCO_VAL_CAPTIONS.read_text())
    annotations = coco["annotations"][:count]
    ids = {a["image_id"] for a in annotations}
    path.write_text(json.dumps({"images": [im for im in coco["images"] if im["id"] in ids],
                                "annotations": annotations}))
    return path


def comparable_manifest(directory: Path) -> dict:
    """A datastore's manifest without what differs between two builds of the same inputs (time, input folder)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.pop("created")
    manifest["inputs"] = [{**item, "path": Path(item["path"]).name} for item in manifest["inputs"]]
    return manifest


@pytest.mark.slow
def test_ray_datastore_build_matches_single_process(cluster, tmp_path):
    """`datastore build --engine ray` (two embedding actors, 4 shards) on 3,000 COCO val captions: the same
    captions, vectors, manifest and flat-index search results as the single-process build."""
    import faiss
    import numpy as np
    import torch

    from conftest import GPT2_TOKENIZER_DIR
    from smallcap.cli import main
    from smallcap.retrieval.build import build_datastore
    from smallcap.retrieval.datastore import Datastore

    torch.set_num_threads(1)
    subset = coco_caption_subset(tmp_path / "captions.json", 3000)
    options = ["--encoder", "mini-clip", "--index", "flat", "--tokenizer", str(GPT2_TOKENIZER_DIR),
               "--shard-size", "800", "--batch-size", "200", "--device", "cpu"]
    assert main(["datastore", "build", str(subset), "--out", str(tmp_path / "ray"), *options,
                 "--engine", "ray", "--num-workers", "2"]) == 0
    local = build_datastore([subset], tmp_path / "local", "mini-clip", index="flat", tokenizer=str(GPT2_TOKENIZER_DIR),
                            shard_size=800, batch_size=200, progress=False)
    distributed = Datastore.load(tmp_path / "ray")
    assert len(distributed) == len(local) > 2900
    for name in ("captions.txt", "source_ids.txt", "source_files.npy"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert comparable_manifest(tmp_path / "ray") == comparable_manifest(tmp_path / "local")
    vectors = [faiss.read_index(str(tmp_path / side / "index.faiss")) for side in ("ray", "local")]
    rows = [index.reconstruct_n(0, index.ntotal) for index in vectors]
    assert np.array_equal(rows[0], rows[1])
    queries = rows[1][:50] + np.random.default_rng(0).normal(0, 0.05, (50, rows[1].shape[1])).astype(np.float32)
    assert distributed.search(queries, 8).captions == local.search(queries, 8).captions


@pytest.mark.slow
def test_ray_datastore_build_ivf_and_ivfpq(cluster, tmp_path):
    """IVF and IVF-PQ on Ray (6,000 COCO val captions, 8 shards): trained on a sample of the embedded shards,
    then filled from them, as the single-process build does, so the index file is the same byte for byte; a
    caption's own embedding finds it."""
    import numpy as np
    import torch

    from conftest import GPT2_TOKENIZER_DIR
    from smallcap.cli import main
    from smallcap.retrieval.build import build_datastore, embed_captions
    from smallcap.retrieval.datastore import Datastore
    from smallcap.retrieval.encoders import load_encoder
    from smallcap.retrieval.index import IndexSpec, train_sample_size

    torch.set_num_threads(1)
    encoder = load_encoder("mini-clip", device="cpu")
    subset = coco_caption_subset(tmp_path / "captions.json", 6000)
    for kind, faiss_class in (("ivf", "IndexIVFFlat"), ("ivfpq", "IndexRefineFlat")):
        assert main(["datastore", "build", str(subset), "--out", str(tmp_path / f"ray-{kind}"),
                     "--encoder", "mini-clip", "--index", kind, "--tokenizer", str(GPT2_TOKENIZER_DIR),
                     "--shard-size", "800", "--batch-size", "200", "--device", "cpu", "--engine", "ray"]) == 0
        local = build_datastore([subset], tmp_path / f"local-{kind}", encoder, index=kind,
                                tokenizer=str(GPT2_TOKENIZER_DIR), shard_size=800, batch_size=200, progress=False)
        distributed = Datastore.load(tmp_path / f"ray-{kind}")
        manifest = comparable_manifest(tmp_path / f"ray-{kind}")
        assert manifest == comparable_manifest(tmp_path / f"local-{kind}")
        assert (manifest["index"]["type"], manifest["index"]["faiss"]) == (kind, faiss_class)
        assert manifest["index"]["params"]["nlist"] == 64 and len(distributed) > 5900
        if kind == "ivf":  # a strict sample (ivfpq trains on up to 10,000 vectors: all of these)
            assert train_sample_size(IndexSpec(kind, manifest["index"]["params"]), len(distributed)) < 5000
        for name in ("index.faiss", "captions.txt", "source_ids.txt"):
            assert (tmp_path / f"ray-{kind}" / name).read_bytes() == (tmp_path / f"local-{kind}" / name).read_bytes()
        rows = list(range(0, len(distributed), 97))
        captions = [distributed.caption(row) for row in rows]
        found = distributed.search(embed_captions(encoder, captions, 200), 4).captions
        assert found == local.search(embed_captions(encoder, captions, 200), 4).captions
        # Measured: ivf 100%, ivfpq 81% (its PQ codebooks train on 5,985 vectors here, fewer than faiss's 9,984
        # for 256 codes, and 8-d sub-vectors of the tiny encoder; exact flat search: 100%).
        hits = np.mean([caption in result for caption, result in zip(captions, found)])
        assert hits >= {"ivf": 0.95, "ivfpq": 0.7}[kind], f"{kind}: a caption's own embedding is in its top 4 " \
                                                           f"for only {hits:.0%}"


@pytest.mark.slow
def test_cli_predict_engine_ray_on_coco_annotations(cluster, local_captions, tmp_path, capsys):
    """`smallcap predict ANNOTATIONS --images-dir DIR --engine ray` writes the file local `predict` writes."""
    from smallcap.cli import main

    coco = json.loads((COCO_MINI / "annotations" / "captions_val2017.json").read_text())
    images = sorted(coco["images"], key=lambda image: image["file_name"])[:7]
    ids = {image["id"] for image in images}
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({"images": images,
                                       "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}))
    common = [str(annotations), "--images-dir", str(VAL), "--model", "mini", "--datastore", "mini-source",
              "--batch-size", "4"]
    assert main(["predict", *common, "--out", str(tmp_path / "ray.json"), "--engine", "ray", "--shard-size", "4",
                 "--output-dir", str(tmp_path / "parts")]) == 0
    assert "2 shards captioned, 0 already done, 7 images, 0 failed" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "parts" / "shards").iterdir()) == ["part-00000.jsonl",
                                                                                       "part-00001.jsonl"]
    assert main(["predict", *common, "--out", str(tmp_path / "local.json")]) == 0
    rows = json.loads((tmp_path / "ray.json").read_text())
    assert rows == json.loads((tmp_path / "local.json").read_text())
    names = {image["id"]: image["file_name"] for image in images}
    assert [row["caption"] for row in rows] == [local_captions[names[row["image_id"]]] for row in rows]

    assert main(["predict", str(annotations), str(VAL), "--out", str(tmp_path / "x.json")]) == 2
    assert "several inputs need --engine ray" in capsys.readouterr().err
    (tmp_path / "retrieved.json").write_text("{}")
    assert main(["predict", str(VAL), "--model", "mini", "--retrieved", str(tmp_path / "retrieved.json"),
                 "--engine", "ray", "--out", str(tmp_path / "x.json")]) == 2
    assert "not supported with --engine ray" in capsys.readouterr().err


@pytest.mark.slow
def test_parquet_outputs_match_jsonl_and_resume(cluster, local_captions, tmp_path, capsys):
    """`--out preds.parquet`: Parquet per-shard files and merged file with the same ids and captions as the JSON
    path (ids mixing tar keys and COCO ints are stored as strings); a rerun skips finished shards; local
    `predict --out X.parquet` writes the same table, which `evaluate`'s reader loads."""
    from smallcap.cli import main
    from smallcap.evaluation import load_predictions
    from smallcap.io import read_parquet_rows

    write_webdataset(tmp_path / "00000.tar", IMAGES[:3])
    folder = tmp_path / "folder"
    folder.mkdir()
    for image in IMAGES[3:7]:
        (folder / image.name).symlink_to(image)
    common = ["--model", "mini", "--datastore", "mini-source", "--batch-size", "4"]
    out = tmp_path / "preds.parquet"
    ray_args = ["predict", str(tmp_path / "00000.tar"), str(folder), *common, "--out", str(out), "--engine", "ray",
                "--shard-size", "2"]
    assert main(ray_args) == 0
    shard_dir = tmp_path / "preds.parquet.shards" / "shards"
    assert sorted(p.name for p in shard_dir.iterdir()) == ["part-00001.parquet", "part-00002.parquet",
                                                           "tar-00000.parquet"]
    rows = read_parquet_rows(out)
    assert [row["image_id"] for row in rows] == [f"img-{p.stem}" for p in IMAGES[:3]] + [p.stem.lstrip("0")
                                                                                         for p in IMAGES[3:7]]
    assert [row["caption"] for row in rows] == [local_captions[p.name] for p in IMAGES[:7]]
    folder_shard = read_parquet_rows(shard_dir / "part-00001.parquet")
    assert [row["image_id"] for row in folder_shard] == [int(p.stem) for p in IMAGES[3:5]]  # one type: kept
    assert all(len(row["retrieved"]) == 4 and "error" not in row for row in folder_shard)

    (shard_dir / "part-00002.parquet").unlink()
    kept = (shard_dir / "tar-00000.parquet").stat().st_mtime_ns
    capsys.readouterr()
    assert main(ray_args) == 0
    assert "1 shards captioned, 2 already done, 7 images" in capsys.readouterr().err
    assert (shard_dir / "tar-00000.parquet").stat().st_mtime_ns == kept
    assert read_parquet_rows(out) == rows

    local = tmp_path / "local.parquet"
    assert main(["predict", str(folder), *common, "--out", str(local)]) == 0
    assert read_parquet_rows(local) == [{"image_id": int(p.stem), "caption": local_captions[p.name]}
                                        for p in IMAGES[3:7]]
    assert load_predictions(local) == {int(p.stem): local_captions[p.name] for p in IMAGES[3:7]}
    assert main(["predict", str(folder), *common, "--out", str(local)]) == 0  # resumes from the finished table
    assert "0 captioned, 4 already done" in capsys.readouterr().err
