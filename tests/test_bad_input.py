"""Bad input the way a user gives it: through the CLI, on real COCO images, with the bundled `mini` model.

Each case checks the exit code, the message and that nothing the user had was lost or left half-written.
The README's "Bad input and what it gets" table is checked against these cases (`test_readme_table`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import pytest

from conftest import COCO_MINI, REPO
from smallcap import cli
from smallcap.captioner import Captioner

VAL = COCO_MINI / "val2017"
GOOD = sorted(VAL.glob("*.jpg"))[:3]
CAPTION_FILE = COCO_MINI / "annotations" / "captions_val2017.json"
MODEL = ["--model", "mini", "--datastore", "mini-source"]


def run(capsys, *args) -> tuple[int, str, str]:
    """`smallcap ARGS` in this process (the model loads in a second); returns (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of side x side pixels (400 million at 20000) that is only ~50 KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return write_bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bomb) -> Path:
    """Three real COCO images and the 20000x20000 PNG."""
    root = tmp_path_factory.mktemp("images")
    for path in GOOD:
        shutil.copy(path, root / path.name)
    shutil.copy(bomb, root / "bomb.png")
    return root


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------- 1. datastore --overwrite
def build_args(out, *extra):
    return ["datastore", "build", "caps.txt", "--out", out, "--encoder", "mini-clip", "--max-tokens", "0", *extra]


def test_overwrite_never_replaces_what_is_not_a_datastore(tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "caps.txt").write_text("a dog on a couch\na cat on a mat\ntwo people riding bikes\n")
    (project / "notes.md").write_text("mine")
    (project / "other").mkdir()
    (project / "other" / "f.txt").write_text("mine too")
    (project / "file.txt").write_text("a file")
    monkeypatch.chdir(project)
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    for out, message in [(".", "current directory"), ("..", "current directory"), ("other", "not a smallcap datastore"),
                         ("file.txt", "is a file")]:
        code, _, err = run(capsys, *build_args(out, "--overwrite"))
        assert code == 2 and "refusing to replace" in err and message in err, (out, err)
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before
    # A folder holding the input is refused too.
    (project / "data").mkdir()
    shutil.copy(project / "caps.txt", project / "data" / "caps.txt")
    code, _, err = run(capsys, "datastore", "build", "data/caps.txt", "--out", "data", "--encoder", "mini-clip",
                       "--max-tokens", "0", "--overwrite")
    assert code == 2 and "holds the input" in err and (project / "data" / "caps.txt").exists()


def test_overwrite_replaces_a_datastore_only_when_the_new_one_is_complete(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("caps.txt").write_text("a dog on a couch\na cat on a mat\n")
    assert run(capsys, *build_args("store"))[0] == 0
    first = json.loads(Path("store/manifest.json").read_text())
    assert first["count"] == 2
    # A build that fails (nothing to index) leaves the old store as it was.
    Path("empty.txt").write_text("\n\n")
    code, _, err = run(capsys, "datastore", "build", "empty.txt", "--out", "store", "--encoder", "mini-clip",
                       "--max-tokens", "0", "--overwrite")
    assert code == 2 and "no captions to index" in err
    assert json.loads(Path("store/manifest.json").read_text()) == first
    Path("caps.txt").write_text("a dog on a couch\na cat on a mat\na red bus\n")
    assert run(capsys, *build_args("store", "--overwrite"))[0] == 0
    assert json.loads(Path("store/manifest.json").read_text())["count"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps.txt", "empty.txt", "store"]  # no leftovers
    # The user's own file inside a store is never deleted.
    Path("store/mine.txt").write_text("mine")
    code, _, err = run(capsys, *build_args("store", "--overwrite"))
    assert code == 2 and "mine.txt" in err and Path("store/mine.txt").read_text() == "mine"


# ------------------------------------------------------------------- 2 + 5. options checked before any work
@pytest.mark.parametrize("args, option", [
    (["caption", *GOOD[:1], "--batch-size", "-3"], "--batch-size"),
    (["caption", *GOOD[:1], "--batch-size", "0"], "--batch-size"),
    (["caption", *GOOD[:1], "--num-beams", "0"], "--num-beams"),
    (["caption", *GOOD[:1], "--num-beams", "-2"], "--num-beams"),
    (["caption", *GOOD[:1], "--max-new-tokens", "0"], "--max-new-tokens"),
    (["caption", *GOOD[:1], "--k", "0"], "--k"),
    (["caption", *GOOD[:1], "--k", "-1"], "--k"),
    (["caption", *GOOD[:1], "--max-image-pixels", "0"], "--max-image-pixels"),
    (["predict", VAL, "--batch-size", "-1"], "--batch-size"),
    (["datastore", "search", "mini-source", "--text", "a dog", "-k", "0"], "-k"),
    (["datastore", "build", CAPTION_FILE, "--out", "x", "--batch-size", "0"], "--batch-size"),
    (["datastore", "retrieve", "mini-source", "--data", VAL, "--out", "x.json", "--keep", "0"], "--keep"),
    (["features", "extract", CAPTION_FILE, "--model", "mini", "--out", "f", "--batch-size", "0"], "--batch-size"),
    (["train", CAPTION_FILE, "--output-dir", "t", "--epochs", "0"], "--epochs"),
])
def test_bad_option_values_are_usage_errors(args, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--out", "p.json"] if args[0] == "predict" else ["--output", "c.jsonl"] if args[0] == "caption" else []
    code, _, err = run(capsys, *args, *extra)
    assert code == 2 and f"argument {option}" in err and "must be at least" in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_k_larger_than_the_context_is_capped_with_a_warning(capsys, tmp_path):
    out = tmp_path / "c.jsonl"
    code, _, err = run(capsys, "caption", GOOD[0], *MODEL, "--k", "100", "--output", out)
    assert code == 0 and "do not fit the model's 256-token context" in err
    row, = read_jsonl(out)
    assert row["caption"] and 1 <= len(row["retrieved"]) < 100


def test_empty_retrieved_list_is_refused_before_any_work(capsys, tmp_path):
    table = tmp_path / "retrieved.json"
    table.write_text(json.dumps({str(int(GOOD[0].stem)): []}))
    code, _, err = run(capsys, "caption", GOOD[0], "--model", "mini", "--retrieved", table, "--output", tmp_path / "c")
    assert code == 2 and "empty list" in err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_weights_name_the_file(damage, capsys, tmp_path):
    from smallcap.hub import bundled_path

    model = tmp_path / "model"
    shutil.copytree(bundled_path("mini"), model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 3] if damage == "truncate" else data[:8] + b"#garbled#" + data[17:])
    code, _, err = run(capsys, "caption", GOOD[0], "--model", model, "--no-retrieval")
    assert code == 2 and f"{weights} is damaged or incomplete" in err and "again" in err, err


# ------------------------------------------------------------------------------- 3. oversized images
def test_oversized_image_is_a_per_input_error_and_the_rest_run(folder, capsys, tmp_path):
    out = tmp_path / "c.jsonl"
    code, _, err = run(capsys, "caption", folder, *MODEL, "--output", out, "--batch-size", "2")
    rows = read_jsonl(out)
    assert code == 1 and len(rows) == 4
    assert [r["image"] for r in rows if "caption" in r] == [str(folder / p.name) for p in GOOD]
    bad, = [r for r in rows if "error" in r]
    assert "20000x20000" in bad["error"] and "--max-image-pixels" in bad["error"]
    preds = tmp_path / "p.json"
    code, _, err = run(capsys, "predict", folder, *MODEL, "--out", preds)
    assert code == 1 and "image bomb:" in err
    assert sorted(r["image_id"] for r in json.loads(preds.read_text())) == sorted(int(p.stem) for p in GOOD)


def test_retrieve_goes_on_past_an_unreadable_image_and_names_it(folder, capsys, tmp_path):
    out = tmp_path / "retrieved.json"
    code, stdout, err = run(capsys, "datastore", "retrieve", "mini-source", "--data", folder, "--keep", "3",
                            "--no-exclude-own", "--out", out)
    assert code == 1 and "image bomb:" in err and "20000x20000" in err and "1 could not be read" in stdout, err
    retrieved = json.loads(out.read_text())
    assert sorted(retrieved) == sorted(str(int(p.stem)) for p in GOOD)
    assert all(len(captions) == 3 for captions in retrieved.values())


def test_max_image_pixels_sets_the_limit(capsys, tmp_path):
    out = tmp_path / "c.jsonl"
    code, _, _ = run(capsys, "caption", GOOD[0], *MODEL, "--output", out, "--max-image-pixels", "1000")
    assert code == 1 and "more than the 1,000-pixel limit" in read_jsonl(out)[0]["error"]


# ------------------------------------------------------------------- 4. output paths, writing as it goes
def test_bad_output_paths_fail_before_any_captioning(capsys, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Captioner, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append(a)))
    (tmp_path / "file").write_text("x")
    for option, target, message in [("--output", tmp_path, "is a directory"),
                                    ("--output", tmp_path / "file" / "c.jsonl", "is a file"),
                                    ("--out", tmp_path, "is a directory")]:
        verb = "caption" if option == "--output" else "predict"
        source = GOOD[0] if verb == "caption" else VAL
        code, _, err = run(capsys, verb, source, *MODEL, option, target)
        assert code == 2 and message in err, err
    assert calls == [] and (tmp_path / "file").read_text() == "x"


def test_interrupted_caption_keeps_what_was_done_and_a_rerun_skips_it(folder, capsys, tmp_path, monkeypatch):
    out = tmp_path / "c.jsonl"
    original = Captioner._caption_batch
    batches = []

    def interrupt_second_batch(self, *args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "_caption_batch", interrupt_second_batch)
    code, _, err = run(capsys, "caption", *GOOD, *MODEL, "--output", out, "--batch-size", "1")
    assert code == 130 and "interrupted" in err
    first = read_jsonl(out)
    assert [r["image"] for r in first] == [str(GOOD[0])] and first[0]["caption"]
    monkeypatch.setattr(Captioner, "_caption_batch", original)
    with open(out, "a") as handle:
        handle.write('{"image": "cut off by the interrup')  # a half-written last line
    code, _, err = run(capsys, "caption", *GOOD, *MODEL, "--output", out, "--batch-size", "2")
    assert code == 0 and "1 inputs already captioned" in err
    rows = [json.loads(line) for line in out.read_text().splitlines() if not line.startswith('{"image": "cut')]
    assert [r["image"] for r in rows] == list(map(str, GOOD)) and rows[0] == first[0]


# --------------------------------------------------------- 6. predict and caption resume only with their settings
def test_predict_and_caption_refuse_to_resume_with_other_settings(capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in GOOD[:2]:
        shutil.copy(path, images / path.name)
    preds = tmp_path / "p.json"
    assert run(capsys, "predict", images, *MODEL, "--out", preds)[0] == 0
    done = preds.read_bytes()
    assert json.loads(Path(f"{preds}.settings.json").read_text())["num_beams"] == 3
    for args in ([*MODEL, "--num-beams", "1"], ["--model", "mini", "--datastore", "mini-target"],
                 ["--model", "mini", "--no-retrieval"]):
        code, _, err = run(capsys, "predict", images, *args, "--out", preds)
        assert code == 2 and "made with other settings" in err and "--overwrite" in err, err
        assert preds.read_bytes() == done
    code, _, err = run(capsys, "predict", images, *MODEL, "--out", preds)
    assert code == 0 and "0 captioned, 2 already done" in err and preds.read_bytes() == done
    code, _, err = run(capsys, "predict", images, "--model", "mini", "--no-retrieval", "--out", preds, "--overwrite")
    assert code == 0 and "2 captioned, 0 already done" in err
    assert json.loads(Path(f"{preds}.settings.json").read_text())["retrieval"] is False
    # `caption --output` appends and resumes the same way: another configuration is refused, the file untouched.
    out = tmp_path / "c.jsonl"
    assert run(capsys, "caption", GOOD[0], *MODEL, "--output", out)[0] == 0
    captioned = out.read_bytes()
    code, _, err = run(capsys, "caption", *GOOD[:2], *MODEL, "--num-beams", "1", "--output", out)
    assert code == 2 and "made with other settings" in err and "num_beams: 3 then, 1 now" in err, err
    assert out.read_bytes() == captioned
    code, _, err = run(capsys, "caption", *GOOD[:2], *MODEL, "--output", out)
    assert code == 0 and "1 inputs already captioned" in err and len(read_jsonl(out)) == 2


# ------------------------------------------------------------------------------- 7. datastore search
def test_search_answers_every_query_with_per_query_errors(capsys, tmp_path, bomb):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(GOOD[0].read_bytes()[:300])
    code, out, err = run(capsys, "datastore", "search", "mini-source", "--text", "a red circle", "--text",
                         "a blue square", "--image", broken, GOOD[0], "--image", bomb, "-k", "2", "--json")
    rows = {row["query"]: row for row in json.loads(out)}
    assert code == 1 and set(rows) == {"a red circle", "a blue square", str(broken), str(GOOD[0]), str(bomb)}
    assert all(len(rows[q]["results"]) == 2 for q in ("a red circle", "a blue square", str(GOOD[0])))
    assert rows["a red circle"]["results"] != rows["a blue square"]["results"]
    assert "error" in rows[str(broken)] and "20000x20000" in rows[str(bomb)]["error"]


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory) -> Path:
    """A 2-second H.264 clip of real COCO images, 12 fps."""
    av = pytest.importorskip("av")
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = [np.asarray(Image.open(p).convert("RGB").resize((96, 64))) for p in GOOD[:2] for _ in range(12)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.height, stream.width, stream.pix_fmt = 64, 96, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_search_and_caption_read_a_video_alike(capsys, clip_mp4):
    code, out, _ = run(capsys, "datastore", "search", "mini-source", "--image", clip_mp4, "-k", "1", "--json")
    assert code == 0 and len(json.loads(out)[0]["results"]) == 1
    code, out, _ = run(capsys, "caption", clip_mp4, *MODEL)
    assert code == 0 and json.loads(out)["caption"]


# ------------------------------------------------------------------------------------- 8. offline
def _cli_without_network(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(REPO / "src"), HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(cwd / "hf-home"))
    return subprocess.run([sys.executable, "-m", "smallcap", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.slow  # two fresh interpreters that import torch
def test_unreachable_hub_fails_fast_naming_the_way_out(tmp_path):
    started = time.monotonic()
    result = _cli_without_network("datastore", "build", CAPTION_FILE, "--out", "store", "--encoder", "mini-clip",
                                  cwd=tmp_path)
    assert result.returncode == 2 and "cannot be reached" in result.stderr
    assert "--tokenizer" in result.stderr and "--max-tokens 0" in result.stderr and "--model mini" in result.stderr
    result = _cli_without_network("caption", GOOD[0], cwd=tmp_path)
    assert result.returncode == 2 and "Yova/SmallCap7M" in result.stderr and "--model mini" in result.stderr
    assert time.monotonic() - started < 120  # no Hub retries (they took ~55 s per command)
    assert not (tmp_path / "store").exists()


def test_datastore_for_a_model_filters_with_its_tokenizer_and_says_what_it_drops(capsys, tmp_path):
    code, _, err = run(capsys, "datastore", "build", CAPTION_FILE, "--out", tmp_path / "store", "--encoder",
                       "mini-clip", "--model", "mini")
    assert code == 0
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    counts = manifest["filters"]["counts"]
    assert manifest["filters"]["tokenizer"] == "mini"
    share = round(100 * counts["too_long"] / counts["read"])
    assert share > 10 and f"({share}%) are longer than 25 tokens of the mini tokenizer" in err
    assert "--max-tokens 0" in err


# ------------------------------------------------------------------------------------- 9. damaged video
def test_truncated_video_warns_with_the_frames_read(capsys, tmp_path, clip_mp4):
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "cut.webm"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=12)
        stream.height, stream.width, stream.pix_fmt = 64, 96, "yuv420p"
        stream.options = {"g": "6", "crf": "4", "b": "1M"}
        for i in range(48):
            picture = np.full((64, 96, 3), (i * 5) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"cut\.webm: only \d+ frames .* truncated"):
        code, out, _ = run(capsys, "caption", path, *MODEL)
    assert code == 0 and json.loads(out)["caption"]


# ------------------------------------------------------------------------------------------ fuzz
def test_garbled_videos_get_per_input_errors(capsys, tmp_path, clip_mp4):
    """Seeded damage to a real H.264 clip (bytes flipped, cut short, a block overwritten): each copy is captioned
    or gets its own error; the good image next to them is captioned; never a traceback."""
    data, rng = clip_mp4.read_bytes(), random.Random(5)
    paths = []
    for n in range(12):
        damaged = bytearray(data)
        if n % 3 == 0:
            for _ in range(rng.choice([5, 50, 300])):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        elif n % 3 == 1:
            damaged = damaged[:rng.randrange(len(damaged))]
        else:
            at = rng.randrange(len(damaged))
            damaged[at:at + rng.randrange(1, 2000)] = rng.randbytes(64)
        paths.append(tmp_path / f"damaged{n}.mp4")
        paths[-1].write_bytes(bytes(damaged))
    out = tmp_path / "c.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged clip may warn about the frames it lost
        code, _, err = run(capsys, "caption", GOOD[0], *paths, *MODEL, "--output", out, "--batch-size", "4")
    rows = read_jsonl(out)
    assert code in (0, 1) and "Traceback" not in err and len(rows) == 13
    assert rows[0]["image"] == str(GOOD[0]) and rows[0]["caption"]
    assert all(("caption" in row) != ("error" in row) for row in rows)
    assert all(row["error"].startswith(row["image"]) for row in rows if "error" in row)


def test_random_option_and_input_mixes_never_crash_or_lose_good_results(capsys, tmp_path, bomb):
    """Seeded random mixes of good/bad inputs and good/bad option values: a usage error before any output, or
    exit 0/1 with every good image captioned; never a traceback."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(GOOD[1].read_bytes()[:500])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    pool = {"good": GOOD, "bad": [broken, text, bomb, tmp_path / "missing.png"]}
    values = {"--batch-size": ["1", "3", "0", "-2", "x"], "--num-beams": ["1", "2", "0"],
              "--max-new-tokens": ["5", "0", "-1"], "--k": ["1", "6", "0", "300"]}
    rng = random.Random(11)
    for trial in range(6):
        inputs = rng.sample(pool["good"], rng.randint(0, 2)) + rng.sample(pool["bad"], rng.randint(0, 2))
        if not inputs:
            inputs = [GOOD[2]]
        rng.shuffle(inputs)
        options = [x for name in rng.sample(sorted(values), 2) for x in (name, rng.choice(values[name]))]
        out = tmp_path / f"c{trial}.jsonl"
        code, _, err = run(capsys, "caption", *inputs, *MODEL, *options, "--output", out)
        assert "Traceback" not in err, (inputs, options, err)
        bad_value = any(v in ("0", "-1", "-2", "x") for v in options[1::2])
        if bad_value:
            assert code == 2 and not out.exists(), (options, err)
            continue
        rows = {row["image"]: row for row in read_jsonl(out)}
        assert set(rows) == set(map(str, inputs))
        good = [str(p) for p in inputs if p in GOOD]
        assert all(rows[name].get("caption") for name in good)
        assert code == (0 if len(good) == len(inputs) else 1)


# ------------------------------------------------------------------------------ README table stays true
README_CASES = {  # README row (first cell) -> the test above that shows it
    "`datastore build --overwrite` onto `.`, a parent, a folder of other files": "test_overwrite_never_replaces",
    "`--overwrite` onto an existing datastore": "test_overwrite_replaces_a_datastore",
    "`--batch-size`, `--num-beams`, `--max-new-tokens`, `--k`, `-k` below 1": "test_bad_option_values",
    "`--k` larger than the prompt can hold": "test_k_larger_than_the_context",
    "empty list of retrieved captions": "test_empty_retrieved_list",
    "truncated or garbled `model.safetensors`": "test_damaged_weights",
    "image over `--max-image-pixels` (e.g. 20000x20000)": "test_oversized_image",
    "`--output`/`--out` is a directory or cannot be written": "test_bad_output_paths",
    "Ctrl-C during `caption --output`": "test_interrupted_caption",
    "rerun of `predict` or `caption --output` with other settings": "test_predict_and_caption_refuse_to_resume",
    "`datastore search` with several `--text`/`--image`, some unreadable": "test_search_answers_every_query",
    "`datastore retrieve` over images some of which are unreadable": "test_retrieve_goes_on_past",
    "`datastore search --image clip.mp4`": "test_search_and_caption_read_a_video",
    "Hub id without network": "test_unreachable_hub_fails_fast",
    "length filter dropping most captions": "test_datastore_for_a_model_filters",
    "truncated video": "test_truncated_video_warns",
    "damaged or garbled video file": "test_garbled_videos",
}


def test_readme_table():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Bad input and what it gets", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]
    assert rows == list(README_CASES), "README table and tests/test_bad_input.py disagree"
    names = {name for name in globals() if name.startswith("test_")}
    for prefix in README_CASES.values():
        assert any(name.startswith(prefix) for name in names), prefix
    assert re.search(r"\| *Case *\| *What you get *\|", section)
