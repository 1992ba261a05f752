"""The opt-in fast modes (`--dtype bfloat16`, `--quantize int8`) as a user runs them: through the CLI on real COCO
images with the bundled `mini` model, their agreement with exact float32 captions measured; bad combinations of
--device/--dtype/--quantize refused before anything loads; predict's resume record and the server know the mode."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import COCO_MINI
from smallcap import cli

IMAGES = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:16]
MODEL = ["--model", "mini", "--datastore", "mini-source"]
MODES = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"]}
# Exact-caption agreement with float32 on these 16 images, measured on this project's CPU (torch 2.13, 1 thread):
# bfloat16 15/16 (14/16 before its logits were computed in float32), int8 12/16 (all 79 coco-mini val images
# through `predict`: 71/79 and 58/79; benchmarks/fast_modes_quality.py), measured with transformers' generate;
# with continuous batching (smallcap.beam_batching, attention in float32): bfloat16 15/16, int8 11/16 (all 79 in
# batches of 16 through the Python API: 74/79 and 59/79). The mini model is tiny (its logits are
# close together), so it is a harsh case; the floor leaves room for other CPUs' kernels.
MIN_AGREEMENT = {"bfloat16": 10 / 16, "int8": 10 / 16}


def smallcap(*args) -> int:
    """`smallcap ARGS` in this process; returns the exit code (argparse usage errors included)."""
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> dict[str, dict[str, str]]:
    """{mode: {image file: caption}} from `smallcap caption` in each mode, threads pinned to one."""
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    out = tmp_path_factory.mktemp("fast_modes")
    result = {}
    try:
        for mode, options in MODES.items():
            path = out / f"{mode}.jsonl"
            assert smallcap("caption", *MODEL, *options, *IMAGES, "--output", path) == 0
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            result[mode] = {row["image"]: row["caption"] for row in rows}
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    return result


@pytest.mark.parametrize("mode", ["bfloat16", "int8"])
def test_fast_mode_captions_agree_with_float32(captions, mode):
    exact, fast = captions["float32"], captions[mode]
    assert sorted(fast) == sorted(exact) == sorted(map(str, IMAGES))
    assert all(fast.values()), "every image gets a caption"
    agreement = sum(fast[image] == exact[image] for image in exact) / len(exact)
    assert agreement >= MIN_AGREEMENT[mode], f"{mode}: {agreement:.0%} of captions equal float32's"


def test_bfloat16_computes_logits_in_float32():
    import torch

    from smallcap.captioner import Captioner
    from smallcap.loading import load_captioner_parts
    from smallcap.precision import Float32Logits, apply_precision

    model = Captioner.from_pretrained("mini", dtype="bfloat16").model
    head, embeddings = model.decoder.get_output_embeddings(), model.decoder.get_input_embeddings()
    assert isinstance(head, Float32Logits)
    assert model.dtype == embeddings.weight.dtype == torch.bfloat16  # the rest stays in bfloat16
    hidden = torch.randn(2, 3, embeddings.weight.shape[1], generator=torch.Generator().manual_seed(0)).bfloat16()
    logits = head(hidden)
    assert logits.dtype == torch.float32  # the tied (bfloat16-rounded) weights, multiplied in float32
    torch.testing.assert_close(logits, hidden.float() @ embeddings.weight.float().T)
    assert not torch.equal(logits, logits.bfloat16().float()), "not rounded to bfloat16"
    # float32 is untouched, and the all-bfloat16 variant (for measuring the difference) is still there
    assert not isinstance(Captioner.from_pretrained("mini").model.decoder.get_output_embeddings(), Float32Logits)
    plain = apply_precision(load_captioner_parts("mini")[0], "cpu", "bfloat16", float32_logits=False)
    assert plain.decoder.get_output_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("options, message", [
    (["--dtype", "float16"], "bfloat16"),  # float16 on CPU: slower than float32, so refused with the fix
    (["--quantize", "int8", "--dtype", "bfloat16"], "cannot be combined"),
    (["--quantize", "int8", "--device", "cuda"], "CPU only"),
    (["--quantize", "int4"], "invalid choice"),
])
@pytest.mark.parametrize("command", ["caption", "predict", "serve"])
def test_bad_precision_options_fail_before_any_work(capsys, tmp_path, command, options, message):
    out = tmp_path / "out.json"
    args = {"caption": ["caption", *MODEL, IMAGES[0], "--output", out],
            "predict": ["predict", COCO_MINI / "val2017", *MODEL, "--out", out],
            "serve": ["serve", "--port", "1"]}[command]
    assert smallcap(*args, *options) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing written"


def test_predict_records_the_mode_and_refuses_to_mix_modes(capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in IMAGES[:2]:
        shutil.copy(path, images)
    preds = tmp_path / "preds.json"
    base = ["predict", images, "--model", "mini", "--no-retrieval", "--out", preds]
    assert smallcap(*base, "--quantize", "int8") == 0
    record = preds.with_name("preds.json.settings.json")
    assert json.loads(record.read_text())["quantize"] == "int8"
    assert len(json.loads(preds.read_text())) == 2
    capsys.readouterr()
    assert smallcap(*base) == 2  # float32 now, int8 then: resuming would mix two modes in one file
    assert "quantize: 'int8' then, 'none' now" in capsys.readouterr().err
    # A record written before --quantize existed was made without quantization: resuming it unquantized is fine.
    settings = json.loads(record.read_text())
    settings.pop("quantize")
    record.write_text(json.dumps(settings))
    assert smallcap(*base) == 0
    assert smallcap(*base, "--quantize", "int8") == 2


def test_predict_refuses_to_resume_bfloat16_output_made_before_float32_logits(capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(IMAGES[0], images)
    preds = tmp_path / "preds.json"
    base = ["predict", images, "--model", "mini", "--no-retrieval", "--dtype", "bfloat16", "--out", preds]
    assert smallcap(*base) == 0
    record = preds.with_name("preds.json.settings.json")
    settings = json.loads(record.read_text())
    assert settings["logits"] == "float32"
    settings.pop("logits")  # as recorded before bfloat16 computed its logits in float32
    record.write_text(json.dumps(settings))
    capsys.readouterr()
    assert smallcap(*base) == 2
    assert "logits: None then, 'float32' now" in capsys.readouterr().err
    settings.update(dtype="float32", quantize="none")  # a float32 record from before knows no "logits" either
    record.write_text(json.dumps(settings))
    assert smallcap(*[a for a in base if a not in ("--dtype", "bfloat16")]) == 0


def test_server_captions_in_int8_and_says_so(captions):
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'smallcap[serve]'")
    import httpx

    from serving_helpers import live_server, wait_ready
    from smallcap.serving.app import create_app
    from smallcap.serving.engine import Engine

    engine = Engine.load("mini", ["mini-source"], quantize="int8")
    with live_server(create_app(lambda: engine)) as url, httpx.Client(base_url=url, timeout=120) as client:
        wait_ready(client)
        model = client.get("/v1/model").json()
        assert (model["quantize"], model["dtype"]) == ("int8", "float32")
        files = [("files", (path.name, path.read_bytes(), "image/jpeg")) for path in IMAGES[:2]]
        results = client.post("/v1/captions", files=files).json()["results"]
    assert len(results) == 2 and all(result["caption"] for result in results)


def test_throughput_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path):
    import importlib.util

    import torch

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("caption_throughput", REPO / "benchmarks/caption_throughput.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    before = torch.get_num_threads()
    try:
        result = benchmark.main(["--tiny", "--images", "3", "--batch-sizes", "2", "3", "--dot-boosts", "3",
                                 "--threads", "1", "--compare-logits-precision", "--repeats", "2",
                                 "--out", str(tmp_path / "throughput.json")])
    finally:
        torch.set_num_threads(before)
    modes = [(row["variant"].split(":")[0], row["mode"]) for row in result["rows"]]
    assert modes == [("reference loop", "float32"), ("smallcap exact", "float32"), ("smallcap exact", "float32"),
                     ("smallcap exact, earlier path", "float32"),
                     ("smallcap exact, batches sorted by prompt length", "float32"),
                     ("smallcap bfloat16", "bfloat16"), ("smallcap bfloat16, logits in bfloat16 (before)", "bfloat16"),
                     ("smallcap int8 dynamic quantization (decoder linear layers)", "int8")]
    assert result["rows"][4]["batch_size"] == 2  # sorting is measured where there are several batches
    for row in result["rows"][:5]:  # exact modes: batched decoding gives the reference loop's captions
        assert row["identical_to_reference_loop"] == 1.0 and row["speedup_vs_reference_loop"] > 0
    assert [len(row.get("seconds_each_repeat", [])) for row in result["rows"]] == [0, 0, 0, 0, 0, 2, 2, 0]
    assert json.loads((tmp_path / "throughput.json").read_text()) == result
    assert "| ×3 | reference loop" in (tmp_path / "throughput.md").read_text()


def _quality_benchmark():
    """benchmarks/fast_modes_quality.py, loaded as a module."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("fast_modes_quality", REPO / "benchmarks/fast_modes_quality.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_quality_benchmark_regenerates_the_bundles_world(tmp_path, monkeypatch):
    """benchmarks/fast_modes_quality.py measures the bundled model on its own miniature world's test images, which
    it regenerates from the bundle's seed and preset: that world must be the bundle's, and another one is refused."""
    benchmark = _quality_benchmark()
    world = benchmark.regenerate_world(tmp_path / "world")
    recorded = benchmark.bundle_record()["world"]["pretraining_metrics"]["retrieval"]
    checks = json.loads((world / "checks.json").read_text())
    for domain in ("source", "target"):
        assert checks["retrieval_metrics"][domain]["recall@1"] == recorded[domain]["recall@1"]
        entries = json.loads((world / domain / f"dataset_{domain}.json").read_text())["images"]
        assert sum(entry["split"] == "test" for entry in entries) == 30
    record = benchmark.bundle_record()
    record["config"]["seed"] = 1  # a different world
    monkeypatch.setattr(benchmark, "bundle_record", lambda: record)
    with pytest.raises(RuntimeError, match="differs from the bundle's sample"):
        benchmark.regenerate_world(tmp_path / "other")


def test_quality_benchmark_refuses_an_unfinished_experiment_before_any_work(tmp_path, monkeypatch, capsys):
    """`fast_modes_quality.py --experiment RUN` (a miniworld run's trained model) names the missing part of a run
    that is absent or unfinished, and writes nothing (tests/test_small_world.py measures a finished one)."""
    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script
    benchmark = _quality_benchmark()
    out = tmp_path / "quality.json"
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--experiment", str(tmp_path / "run"), "--out", str(out)])
    assert refused.value.code == 2 and "run/experiment.json is missing" in capsys.readouterr().err
    (tmp_path / "run" / "world").mkdir(parents=True)
    (tmp_path / "run" / "experiment.json").write_text(json.dumps({"seed": 0, "preset": "small",
                                                                  "training": {"epochs": 3}}))
    (tmp_path / "run" / "world" / "world.json").write_text(json.dumps({"domains": {"source": {}, "target": {}}}))
    (tmp_path / "run" / "datastores" / "source").mkdir(parents=True)
    with pytest.raises(SystemExit):
        benchmark.main(["--experiment", str(tmp_path / "run"), "--out", str(out)])
    assert "datastores/source/manifest.json is missing" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
