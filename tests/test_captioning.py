"""Captioning as a user does it: batched decoding, the Python API's input types, the CLI and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import golden
from conftest import COCO_MINI, COCO_VAL_CAPTIONS, GOLDEN, run_cli
from smallcap.captioner import Captioner
from smallcap.generation import GenerationSettings
from smallcap.prompt import prompt_ids

VAL_IMAGES = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:10]


@pytest.fixture(scope="module")
def captioner():
    return Captioner.from_pretrained(str(GOLDEN))


@pytest.fixture(scope="module")
def varied_retrieved():
    """1 to 4 real COCO captions of varying length per image, so prompts differ in length."""
    annotations = json.loads(COCO_VAL_CAPTIONS.read_text())["annotations"]
    captions = [a["caption"].strip() for a in sorted(annotations, key=lambda a: a["id"])[:200]]
    return [captions[i * 7:i * 7 + 1 + i % 4] for i in range(len(VAL_IMAGES))]


@pytest.mark.parametrize("num_beams", [3, 1])
def test_batched_decoding_equals_one_at_a_time(captioner, varied_retrieved, num_beams):
    captioner.settings = GenerationSettings(num_beams=num_beams)
    lengths = {len(prompt_ids(captioner.tokenizer, caps)) for caps in varied_retrieved}
    assert len(lengths) > 5  # the batch really mixes prompt lengths
    alone = [captioner([path], retrieved=[caps])[0].caption for path, caps in zip(VAL_IMAGES, varied_retrieved)]
    batched = [r.caption for r in captioner(VAL_IMAGES, retrieved=varied_retrieved, batch_size=5)]
    assert batched == alone
    captioner.settings = GenerationSettings()


def test_api_accepts_paths_pil_images_and_arrays(captioner):
    paths = [str(p) for p in golden.image_paths()[:3]]
    pil = [Image.open(p) for p in paths]
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    floats = [a.astype(np.float32) / 255 for a in arrays]
    retrieved = golden.retrieved()[:3]
    expected = golden.expected_captions("gen_rag_beam3.json")[:3]
    for inputs in (paths, [Path(p) for p in paths], pil, arrays, floats):
        assert [r.caption for r in captioner(inputs, retrieved=retrieved)] == expected
    single = captioner(paths[0], retrieved=retrieved[:1])
    assert [r.caption for r in single] == expected[:1]


def test_api_reports_bad_inputs_and_still_captions_the_rest(captioner, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(golden.image_paths()[0].read_bytes()[:300])
    inputs = [golden.image_paths()[0], text, tmp_path / "missing.png", truncated, golden.image_paths()[1]]
    results = captioner(inputs, retrieved=[golden.retrieved()[0]] + [["x"]] * 3 + [golden.retrieved()[1]], batch_size=2)
    assert [r.caption for r in (results[0], results[4])] == golden.expected_captions("gen_rag_beam3.json")[:2]
    assert "not an image" in results[1].error and "notes.jpg" in results[1].error
    assert "no such file" in results[2].error
    assert "truncated.jpg" in results[3].error


def test_retrieval_required_unless_disabled(captioner):
    from smallcap.errors import SmallCapError

    with pytest.raises(SmallCapError, match="--no-retrieval"):
        captioner(golden.image_paths()[:1])


def test_retrieval_disabled_ignores_given_retrieved_captions(captioner):
    paths = golden.image_paths()[:2]
    without = golden.expected_captions("gen_norag_beam3.json")[:2]
    assert without != golden.expected_captions("gen_rag_beam3.json")[:2]  # retrieved captions would show
    captioner.use_retrieval = False
    try:
        results = captioner(paths, retrieved=golden.retrieved()[:2])
    finally:
        captioner.use_retrieval = True
    assert [r.caption for r in results] == without
    assert all(r.retrieved == [] for r in results)


@pytest.mark.slow
def test_cli_matches_retrieved_by_integer_id_and_reports_bad_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in golden.image_paths()[:2]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG garbage")
    table = dict(zip(golden.image_ids()[:2], golden.retrieved()[:2]), broken=["a cat"])
    retrieved = tmp_path / "retrieved.json"
    retrieved.write_text(json.dumps(table))
    result = run_cli("caption", images, "--model", GOLDEN, "--retrieved", retrieved, check=False)
    assert result.returncode == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("caption") for r in rows[:2]] == golden.expected_captions("gen_rag_beam3.json")[:2]
    assert rows[2]["image"].endswith("broken.png") and "broken.png" in rows[2]["error"]
    assert "1 of 3 inputs could not be captioned" in result.stderr


@pytest.mark.slow
def test_cli_clear_errors(tmp_path):
    image = golden.image_paths()[0]
    cases = [
        (["--model", tmp_path / "nope"], "does not exist"),
        (["--model", GOLDEN, "--retrieved", tmp_path / "none.json"], "none.json does not exist"),
        (["--model", GOLDEN, "--retrieved", GOLDEN / "config.json"], "expected a JSON object {image_id: [caption"),
        (["--model", GOLDEN, "--retrieved", GOLDEN / "target_captions.json"], "expected a JSON object"),
        (["--model", "Yova/SmallCap7M"], "Hub is offline"),
    ]
    for flags, message in cases:
        result = run_cli("caption", image, *flags, check=False, env={"HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2, flags
        assert message in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"42": ["a dog"]}))
    result = run_cli("caption", image, "--model", GOLDEN, "--retrieved", other, check=False)
    assert result.returncode == 2 and "no retrieved captions for image id '000000000139'" in result.stderr


def test_cli_table_output(captioner):
    import io

    from smallcap.cli.caption import print_table

    results = captioner(golden.image_paths()[:1], retrieved=golden.retrieved()[:1])
    stream = io.StringIO()
    print_table(results, stream)
    text = stream.getvalue()
    assert "000000000139.jpg" in text and "caption:   dr Thunder" in text
    assert golden.retrieved()[0][0] in text
