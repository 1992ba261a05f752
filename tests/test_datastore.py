"""Caption datastores on the real 25k COCO val captions with the tiny CLIP: build, search, self-exclusion,
combining, resuming a killed build, import, index types, and a clear error (and no directory) for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import COCO_MINI, COCO_VAL_CAPTIONS, GPT2_TOKENIZER_DIR, REPO, run_cli

from smallcap.data import read_captions
from smallcap.errors import SmallCapError
from smallcap.retrieval.build import build_datastore, import_datastore, load_length_tokenizer
from smallcap.retrieval.datastore import Datastore, MultiDatastore, load_datastores, retrieve_for_training
from smallcap.retrieval.encoders import HFCLIPEncoder, load_encoder
from smallcap.retrieval.index import build_index, choose_index, read_index

COCO_TRAIN_MINI = COCO_MINI / "annotations" / "captions_train2017.json"
# The machine is shared; torch's and faiss's OpenMP threads spin and run up to ~10x slower under contention.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}


def cli(*args, check=True):
    return run_cli(*args, check=check, env=SINGLE_THREAD)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir, single_thread):
    return HFCLIPEncoder.from_pretrained(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def gpt2():
    return load_length_tokenizer(str(GPT2_TOKENIZER_DIR))


@pytest.fixture(scope="module")
def coco_store(tmp_path_factory, encoder, gpt2) -> Datastore:
    """The 25k real COCO val captions embedded with the tiny CLIP (exact index)."""
    started = time.perf_counter()
    store = build_datastore([COCO_VAL_CAPTIONS], tmp_path_factory.mktemp("stores") / "coco", encoder,
                            tokenizer=gpt2, progress=False)
    print(f"built 25k-caption datastore in {time.perf_counter() - started:.1f}s")
    return store


@pytest.fixture(scope="module")
def mini_store(tmp_path_factory, encoder, gpt2) -> Datastore:
    """The 400 coco-mini train captions, a second datastore with the same encoder."""
    return build_datastore([COCO_TRAIN_MINI], tmp_path_factory.mktemp("stores") / "mini", encoder, tokenizer=gpt2,
                           progress=False)


def stored_vectors(store: Datastore) -> np.ndarray:
    return store.index.reconstruct_n(0, store.index.ntotal)


def test_build_filters_by_per_caption_gpt2_length(coco_store, gpt2):
    records = list(read_captions(COCO_VAL_CAPTIONS))
    lengths = [len(gpt2.encode(record.caption)) for record in records]
    expected = [record for record, length in zip(records, lengths) if length <= 25]
    assert len(expected) < len(records)  # some real captions are longer than 25 tokens
    assert len(coco_store) == len(expected)
    assert [coco_store.caption(row) for row in range(len(coco_store))] == [r.caption for r in expected]
    assert [coco_store.source_ids[row] for row in (0, len(coco_store) - 1)] == [str(expected[0].image_id),
                                                                                str(expected[-1].image_id)]
    manifest = coco_store.manifest
    assert manifest["filters"]["counts"] == {"read": 25014, "empty": 0, "too_long": len(records) - len(expected),
                                             "duplicate": 0, "kept": len(expected)}
    assert manifest["index"]["type"] == "flat" and manifest["index"]["faiss"] == "IndexFlatIP"
    assert manifest["encoder"] == {"name": str(coco_store.encoder_name), "dim": 32, "normalisation": "l2"}
    import hashlib

    assert manifest["inputs"][0]["sha256"] == hashlib.sha256(COCO_VAL_CAPTIONS.read_bytes()).hexdigest()
    assert manifest["max_captions_per_source"] == 7  # one val2017 image has 7 captions
    assert coco_store.source_file(0) == str(COCO_VAL_CAPTIONS)
    vectors = stored_vectors(coco_store)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_cli_text_query_returns_the_caption_itself_first_and_images_work(coco_store, encoder):
    caption = "A black Honda motorcycle parked in front of a garage."
    image = sorted((COCO_MINI / "val2017").glob("*.jpg"))[0]
    result = cli("datastore", "search", coco_store.directory, "--text", caption, "--image", image, "-k", "5", "--json")
    by_image, by_text = json.loads(result.stdout)
    hits = by_text["results"]
    assert by_text["query"] == caption and len(hits) == 5
    assert hits[0]["caption"] == caption and hits[0]["source_id"] == "179765"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    from PIL import Image

    expected = coco_store.search(encoder.embed_images([Image.open(image)]), k=5)
    assert by_image["query"] == str(image) and [h["caption"] for h in by_image["results"]] == expected.captions[0]


def test_search_api_batches_and_mmap(coco_store, encoder):
    captions = [coco_store.caption(row) for row in (0, 100, 20000)]
    for store in (coco_store, Datastore.load(coco_store.directory, mmap=False)):
        hits = store.search(encoder.embed_texts(captions), k=4)
        assert len(hits) == 3 and all(len(row) == 4 for row in hits.captions)
        assert [row[0] for row in hits.captions] == captions
        assert all(row == sorted(row, reverse=True) for row in hits.scores)


def test_self_exclusion_drops_the_query_images_captions(coco_store, encoder):
    rows = [row for row in range(len(coco_store)) if coco_store.source_ids[row] == "179765"]
    query = encoder.embed_texts([coco_store.caption(rows[0])])
    plain = coco_store.search(query, k=10)
    assert plain.source_ids[0][0] == "179765"
    excluded = coco_store.search(query, k=10, exclude_source_ids=[179765])
    assert len(excluded.captions[0]) == 10 and "179765" not in excluded.source_ids[0]
    others = [(c, s) for c, s in zip(plain.captions[0], plain.source_ids[0]) if s != "179765"]
    assert list(zip(excluded.captions[0], excluded.source_ids[0]))[:len(others)] == others
    assert coco_store.search(query, k=3, exclude_source_ids=[None]).captions == coco_store.search(query, k=3).captions
    with pytest.raises(SmallCapError, match="2 entries for 1 queries"):
        coco_store.search(query, k=3, exclude_source_ids=[1, 2])


def test_combined_datastores_return_the_unions_best_k(coco_store, mini_store, encoder):
    queries = encoder.embed_texts(["a dog catching a frisbee", "two people on a beach", mini_store.caption(3)])
    combined = MultiDatastore([coco_store, mini_store])
    assert len(combined) == len(coco_store) + len(mini_store)
    hits = combined.search(queries, k=8)
    union_captions = ([coco_store.caption(r) for r in range(len(coco_store))]
                      + [mini_store.caption(r) for r in range(len(mini_store))])
    scores = queries @ np.concatenate([stored_vectors(coco_store), stored_vectors(mini_store)]).T
    for q in range(len(queries)):
        best = np.argsort(-scores[q], kind="stable")[:8]
        np.testing.assert_allclose(hits.scores[q], scores[q][best], atol=1e-5)
        assert hits.captions[q][:3] == [union_captions[i] for i in best[:3]]
    assert hits.captions[2][0] == mini_store.caption(3)  # found in the second store
    assert isinstance(load_datastores([coco_store.directory, mini_store.directory]), MultiDatastore)


@pytest.mark.slow
def test_encoder_mismatch_is_an_error(tmp_path, coco_store, mini_store, gpt2):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    other_dir = tmp_path / "other-clip"
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=224, patch_size=32), projection_dim=16)
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(other_dir)
    CLIPTokenizer.from_pretrained(coco_store.encoder_name).save_pretrained(other_dir)
    CLIPImageProcessor.from_pretrained(coco_store.encoder_name).save_pretrained(other_dir)
    other = load_encoder(str(other_dir))
    with pytest.raises(SmallCapError, match=r"shape \(1, 16\), but .* holds 32-d embeddings"):
        coco_store.search(other.embed_texts(["a cat"]), k=3)
    with pytest.raises(SmallCapError, match=r"encoder mismatch: .* holds 32-d embeddings from .* uses 16-d"):
        coco_store.check_encoder(other)
    other_store = build_datastore([COCO_TRAIN_MINI], tmp_path / "other", other, tokenizer=gpt2, progress=False)
    with pytest.raises(SmallCapError, match="encoder mismatch"):
        MultiDatastore([coco_store, other_store])
    result = cli("datastore", "search", coco_store.directory, "--text", "a cat", "--encoder", other_dir, check=False)
    assert result.returncode == 2 and "smallcap datastore: error: encoder mismatch" in result.stderr


@pytest.mark.slow
def test_killed_build_resumes_and_matches_an_uninterrupted_build(tmp_path, coco_store, tiny_clip_dir):
    out, work = tmp_path / "resumed", tmp_path / ".resumed.build"
    args = ["datastore", "build", str(COCO_VAL_CAPTIONS), "--out", str(out), "--encoder", str(tiny_clip_dir),
            "--tokenizer", str(GPT2_TOKENIZER_DIR), "--shard-size", "1024"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **SINGLE_THREAD}
    process = subprocess.Popen([sys.executable, "-m", "smallcap", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(work.glob("embeddings-*.npy")):
        assert process.poll() is None, f"build ended before its first shard: {process.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()
    process.communicate()
    shards = len(list(work.glob("embeddings-*.npy")))
    total = -(-len(coco_store) // 1024)
    assert not out.exists() and 1 <= shards < total
    result = cli(*args)
    assert f"resuming: {shards} of {total} shards already embedded" in result.stderr
    assert not work.exists()
    resumed = Datastore.load(out)
    assert len(resumed) == len(coco_store)
    assert all(resumed.caption(r) == coco_store.caption(r) and resumed.source_ids[r] == coco_store.source_ids[r]
               for r in range(len(resumed)))
    np.testing.assert_allclose(stored_vectors(resumed), stored_vectors(coco_store), atol=2e-5)


def test_stale_work_directory_from_other_settings_is_discarded(tmp_path, encoder, gpt2, capsys):
    out = tmp_path / "store"
    work = tmp_path / ".store.build"
    work.mkdir()
    (work / "plan.json").write_text('{"count": 1}')
    (work / "embeddings-00000.npy").write_bytes(b"stale")
    store = build_datastore([COCO_TRAIN_MINI], out, encoder, tokenizer=gpt2, progress=False)
    assert "discarding" in capsys.readouterr().err and len(store) > 0 and not work.exists()


def test_dedupe_and_splits(tmp_path, encoder, gpt2):
    path = tmp_path / "caps.jsonl"
    rows = [{"caption": "a cat on a mat", "image_id": 1, "split": "train"},
            {"caption": "a cat  on a mat", "image_id": 2, "split": "restval"},
            {"caption": "a dog", "image_id": 3, "split": "test"},
            {"caption": "", "image_id": 4, "split": "train"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = build_datastore([path], tmp_path / "dedupe", encoder, tokenizer=gpt2, dedupe=True, progress=False)
    assert [store.caption(r) for r in range(len(store))] == ["a cat on a mat"]
    assert store.manifest["filters"]["counts"] == {"read": 3, "empty": 1, "too_long": 0, "duplicate": 1, "kept": 1}
    everything = build_datastore([path], tmp_path / "all", encoder, tokenizer=gpt2, splits=None, progress=False)
    assert len(everything) == 3


def test_karpathy_files_are_indexed_as_the_reference_does_unless_told_raw(tmp_path, tiny_clip_dir):
    """`datastore build dataset_coco.json` indexes each sentence's tokens joined by spaces (the reference's datastore
    text, what the reference's models were prompted with); `--text raw` indexes the sentences as written. The
    manifest records which."""
    annotations = json.loads(COCO_TRAIN_MINI.read_text())
    captions: dict[int, list[str]] = {}
    for annotation in sorted(annotations["annotations"], key=lambda a: a["id"]):
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    images = sorted(annotations["images"], key=lambda image: image["id"])[:4]
    tokenize = lambda raw: "".join(c if c.isalnum() else " " for c in raw.lower()).split()  # noqa: E731
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"dataset": "coco", "images": [
        {"filename": image["file_name"], "cocoid": image["id"], "split": split,
         "sentences": [{"raw": raw, "tokens": tokenize(raw)} for raw in captions[image["id"]]]}
        for image, split in zip(images, ("train", "restval", "test", "train"))]}))
    kept = [image for n, image in enumerate(images) if n != 2]
    stores = {}
    for text in ("tokens", "raw"):
        stores[text] = tmp_path / text
        cli("datastore", "build", karpathy, "--out", stores[text], "--encoder", tiny_clip_dir,
            "--tokenizer", GPT2_TOKENIZER_DIR, *([] if text == "tokens" else ["--text", "raw"]))
    default, raw = Datastore.load(stores["tokens"]), Datastore.load(stores["raw"])
    assert default.manifest["filters"]["text"] == "tokens" and raw.manifest["filters"]["text"] == "raw"
    assert [default.caption(r) for r in range(len(default))] == \
        [" ".join(tokenize(c)) for image in kept for c in captions[image["id"]]]
    assert [raw.caption(r) for r in range(len(raw))] == [" ".join(c.split()) for image in kept
                                                           for c in captions[image["id"]]]
    differ = sum(default.caption(r) != raw.caption(r) for r in range(len(raw)))
    assert differ >= 5, differ  # most real captions have a capital or a full stop


def test_retrieval_for_training_drops_own_captions_keeps_7(tmp_path, coco_store, encoder):
    image_ids = ["179765", coco_store.source_ids[500]]
    first_rows = [next(r for r in range(len(coco_store)) if coco_store.source_ids[r] == i) for i in image_ids]
    embeddings = encoder.embed_texts([coco_store.caption(r) for r in first_rows])  # stand-in image embeddings
    out = tmp_path / "retrieved_caps.json"
    retrieved = retrieve_for_training(coco_store, embeddings, image_ids, out_path=out, progress=False)
    assert json.loads(out.read_text()) == retrieved and list(retrieved) == image_ids
    top15 = coco_store.search(embeddings, k=15)
    for q, image_id in enumerate(image_ids):
        expected = [c for c, s in zip(top15.captions[q], top15.source_ids[q]) if s != image_id][:7]
        assert retrieved[image_id] == expected and len(expected) == 7
        own = {coco_store.caption(r) for r in range(len(coco_store)) if coco_store.source_ids[r] == image_id}
        assert not own & set(retrieved[image_id])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_approximate_indexes_memory_mapped(tmp_path, coco_store, encoder, kind):
    vectors = stored_vectors(coco_store)[:12000]  # enough to train every type, quick to build
    spec = choose_index(len(vectors), vectors.shape[1], kind)
    sample = vectors[np.random.default_rng(0).choice(len(vectors), 10_000, replace=False)]
    index = build_index(spec, vectors.shape[1], lambda: [vectors[:5000], vectors[5000:]], sample)
    assert index.ntotal == len(vectors)
    faiss.write_index(index, str(tmp_path / "index"))
    mapped = read_index(tmp_path / "index", spec, mmap=True)
    queries = vectors[::479]
    exact = (queries @ vectors.T).argsort(axis=1)[:, ::-1][:, :4]
    _, found = mapped.search(queries, 4)
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(exact, found)])
    # At the tiny encoder's 32 dims IVF-PQ keeps 4-byte codes, so fewer true neighbours reach the exact
    # re-ranking than at real widths (64-128 bytes; benchmarks/datastore.py); random ranking would give ~0.0003.
    assert recall >= {"ivf": 0.9, "hnsw": 0.9, "ivfpq": 0.5}[kind], recall


def test_forced_index_type_through_build(tmp_path, encoder, gpt2):
    store = build_datastore([COCO_TRAIN_MINI], tmp_path / "hnsw", encoder, tokenizer=gpt2, index="hnsw",
                            progress=False)
    assert store.manifest["index"]["faiss"] == "IndexHNSWFlat"
    hits = store.search(encoder.embed_texts([store.caption(10)]), k=2)
    assert hits.captions[0][0] == store.caption(10)


def test_choose_index_policy():
    assert choose_index(565_497, 1024).type == "flat"  # the published COCO store: exact, as the reference
    many = choose_index(3_000_000, 512, memory_budget=8 << 30)
    assert many.type == "ivfpq" and many.params["nlist"] == 2048 and many.params["nprobe"] == 256
    big = choose_index(800_000, 1024, memory_budget=2 << 30)
    assert big.type == "ivfpq" and big.params["m"] == 128 and "exceed" in big.reason
    assert choose_index(1000, 512, "hnsw").type == "hnsw"
    with pytest.raises(SmallCapError, match="unknown index type 'annoy'"):
        choose_index(10, 8, "annoy")


@pytest.mark.slow
def test_import_published_datastore(tmp_path, encoder, tiny_clip_dir):
    captions = [r.caption for r in read_captions(COCO_TRAIN_MINI)]
    vectors = encoder.embed_texts(captions)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "coco_index"))
    (tmp_path / "coco_index_captions.json").write_text(json.dumps(captions))
    result = cli("datastore", "import", "--index", tmp_path / "coco_index", "--captions",
                 tmp_path / "coco_index_captions.json", "--encoder", tiny_clip_dir, "--out", tmp_path / "imported")
    assert f"{len(captions)} captions" in result.stdout
    store = Datastore.load(tmp_path / "imported")
    assert store.manifest["imported"] and store.dim == vectors.shape[1]
    assert (tmp_path / "imported" / "index.faiss").read_bytes() == (tmp_path / "coco_index").read_bytes()
    assert store.search(vectors[5], k=1).captions == [[captions[5]]]
    keyed = tmp_path / "keyed.json"
    keyed.write_text(json.dumps({str(i): c for i, c in reversed(list(enumerate(captions)))}))
    store = import_datastore(tmp_path / "coco_index", keyed, str(tiny_clip_dir), tmp_path / "keyed_store")
    assert [store.caption(i) for i in range(len(store))] == captions
    info = cli("datastore", "info", tmp_path / "keyed_store")
    assert f"captions    {len(captions)}" in info.stdout and "IndexFlatIP" in info.stdout


def bad_build_cases(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    broken = tmp_path / "broken.json"
    broken.write_text('["a cat", ')
    longs = tmp_path / "long.txt"
    longs.write_text(" ".join(["word"] * 40) + "\n")
    return {
        "empty input": ([empty], {}, "no captions to index in .*empty.txt: 0 read"),
        "all too long": ([longs], {}, r"1 too long, 0 duplicate, 0 kept"),
        "missing input": ([tmp_path / "nope.txt"], {}, "caption file .*nope.txt does not exist"),
        "corrupt input": ([broken], {}, r"caption file .*broken.json is not valid JSON: .* at line 1"),
        "no inputs": ([], {}, "no input caption files given"),
        "missing encoder": ([COCO_TRAIN_MINI], {"encoder": str(tmp_path / "no-such-clip")},
                            "retrieval encoder directory .*no-such-clip.* does not exist"),
    }


@pytest.mark.parametrize("case", ["empty input", "all too long", "missing input", "corrupt input", "no inputs",
                                  "missing encoder"])
def test_bad_build_input_errors_and_leaves_nothing(tmp_path, encoder, gpt2, case):
    inputs, options, message = bad_build_cases(tmp_path)[case]
    before = set(tmp_path.iterdir())
    with pytest.raises(SmallCapError, match=message):
        build_datastore(inputs, tmp_path / "out", options.pop("encoder", encoder), tokenizer=gpt2, progress=False,
                        **options)
    assert set(tmp_path.iterdir()) == before  # neither the datastore nor a work directory


@pytest.mark.slow
def test_existing_output_needs_overwrite(tmp_path, tiny_clip_dir):
    out = tmp_path / "store"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["datastore", "build", COCO_TRAIN_MINI, "--out", out, "--encoder", tiny_clip_dir,
            "--tokenizer", GPT2_TOKENIZER_DIR]
    result = cli(*args, check=False)
    assert result.returncode == 2 and "already exists; pass --overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces a datastore or an empty folder, never a folder of the user's files.
    with pytest.raises(SmallCapError, match="not a smallcap datastore"):
        build_datastore([COCO_TRAIN_MINI], out, str(tiny_clip_dir), tokenizer=str(GPT2_TOKENIZER_DIR),
                        overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    build_datastore([COCO_TRAIN_MINI], out, str(tiny_clip_dir), tokenizer=str(GPT2_TOKENIZER_DIR), overwrite=True,
                    progress=False)
    assert len(Datastore.load(out)) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_bad_import_errors_and_leaves_nothing(tmp_path, encoder):
    vectors = encoder.embed_texts(["a cat", "a dog", "a bird"])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index"))
    (tmp_path / "two.json").write_text(json.dumps(["a cat", "a dog"]))
    (tmp_path / "gaps.json").write_text(json.dumps({"0": "a cat", "1": "a dog", "5": "a bird"}))
    (tmp_path / "corrupt.json").write_text('["a cat", "a dog", ')
    (tmp_path / "garbage_index").write_bytes(b"\x00" * 64)
    cases = [
        ("index", "two.json", "index has 3 rows but .*two.json has 2 captions"),
        ("index", "gaps.json", "row ids are not 0..2 without gaps"),
        ("index", "corrupt.json", "corrupt.json is not valid JSON: .* at line 1 column .*; expected a JSON list"),
        ("index", "missing.json", "caption file .*missing.json does not exist"),
        ("missing_index", "two.json", "index file .*missing_index does not exist"),
        ("garbage_index", "two.json", "garbage_index is not a readable faiss index"),
    ]
    before = set(tmp_path.iterdir())
    for index_name, captions_name, message in cases:
        with pytest.raises(SmallCapError, match=message):
            import_datastore(tmp_path / index_name, tmp_path / captions_name, "open_clip:RN50x64", tmp_path / "out")
        assert set(tmp_path.iterdir()) == before


def test_damaged_datastores_give_clear_errors(tmp_path, mini_store):
    import shutil

    def damaged(name, damage):
        copy = tmp_path / name
        shutil.copytree(mini_store.directory, copy)
        damage(copy)
        return copy

    cases = [
        (tmp_path / "absent", "datastore directory .*absent does not exist"),
        (damaged("no_manifest", lambda d: (d / "manifest.json").unlink()), "no_manifest is not a datastore"),
        (damaged("no_index", lambda d: (d / "index.faiss").unlink()), "missing its index file index.faiss"),
        (damaged("bad_index", lambda d: (d / "index.faiss").write_bytes(b"junk")), "not a readable faiss index"),
        (damaged("short_captions", lambda d: (d / "captions.txt").write_text("one\n")),
         "captions.txt does not match its offsets"),
        (damaged("bad_manifest", lambda d: (d / "manifest.json").write_text("{")), "manifest.json is corrupt"),
    ]
    for directory, message in cases:
        with pytest.raises(SmallCapError, match=message):
            Datastore.load(directory)


def test_open_clip_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what `import open_clip` sees when it is not installed
    with pytest.raises(SmallCapError, match=r"pip install 'smallcap\[open-clip\]'"):
        load_encoder("open_clip:RN50x64/openai")


def test_open_clip_encoder_names():
    from smallcap.retrieval.encoders import canonical_encoder_name

    assert canonical_encoder_name("open_clip:RN50x64") == "open_clip:RN50x64/openai"
    assert canonical_encoder_name("open_clip:ViT-B-32/laion2b_s34b_b79k") == "open_clip:ViT-B-32/laion2b_s34b_b79k"
    assert canonical_encoder_name("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"


def test_open_clip_encoder_when_installed():
    open_clip = pytest.importorskip(
        "open_clip", reason="open_clip is not installed (optional extra: pip install 'smallcap[open-clip]')")
    from PIL import Image

    from smallcap.retrieval.open_clip_encoder import OpenCLIPEncoder

    model, _, preprocess = open_clip.create_model_and_transforms("RN50")  # random weights: no download
    encoder = OpenCLIPEncoder(model, preprocess, open_clip.get_tokenizer("RN50"), "open_clip:RN50/none")
    image = Image.open(sorted((COCO_MINI / "val2017").glob("*.jpg"))[0])
    assert encoder.dim == 1024
    for embedded in (encoder.embed_texts(["a cat", "a dog"]), encoder.embed_images([image, image])):
        assert embedded.shape == (2, 1024) and embedded.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
