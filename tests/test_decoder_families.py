"""Every verb with the OPT and XGLM decoder families, on tiny models built in-test and real COCO images:
features, train (`--decoder <local dir>`), caption, predict and serve; unsupported families; real-size parameter
counts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, coco_training_files, run_cli
from smallcap.captioner import Captioner
from smallcap.errors import SmallCapError
from smallcap.modeling import SmallCap, SmallCapConfig, load_smallcap

N_IMAGES = 4  # x 5 captions: 2 steps of 10 in one epoch
OPT_PACK, XGLM_PACK = SHARED / "golden" / "ref-opt-r4", SHARED / "golden" / "ref-xglm-r8"


def _tiny_opt(out):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=50272, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             ffn_dim=128, max_position_embeddings=512, word_embed_proj_dim=64)).save_pretrained(out)
    # The OPT-style BPE of the golden pack, with OPT's own special tokens back (as facebook/opt-* ship them).
    AutoTokenizer.from_pretrained(OPT_PACK, eos_token="</s>", pad_token="<pad>").save_pretrained(out)


def _tiny_xglm(out):
    from transformers import AutoTokenizer, XGLMConfig, XGLMForCausalLM

    XGLMForCausalLM(XGLMConfig(vocab_size=4008, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                               max_position_embeddings=512)).save_pretrained(out)
    AutoTokenizer.from_pretrained(XGLM_PACK, eos_token="</s>", pad_token="<pad>").save_pretrained(out)


BUILDERS = {"this_opt": _tiny_opt, "this_xglm": _tiny_xglm}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The first real coco-mini train images and their retrieved captions (`conftest.coco_training_files`)."""
    return coco_training_files(tmp_path_factory.mktemp("coco"), N_IMAGES)


@pytest.fixture(scope="module")
def features(coco, tiny_clip_dir, tmp_path_factory):
    """`smallcap features extract` of the training images with the tiny CLIP, shared by both families."""
    out = tmp_path_factory.mktemp("features")
    run_cli("features", "extract", coco["data"], "--images", coco["images"], "--model", tiny_clip_dir, "--out", out)
    return out


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def trained(request, coco, features, tiny_clip_dir, tmp_path_factory):
    """A tiny base decoder of the family (a local directory) and `smallcap train --decoder DIR` on it."""
    decoder_type = request.param
    base = tmp_path_factory.mktemp(decoder_type)
    torch.manual_seed(0)
    BUILDERS[decoder_type](base)
    out = tmp_path_factory.mktemp("run")
    run_cli("train", coco["data"], "--images", coco["images"], "--retrieved", coco["retrieved"],
            "--features", features, "--encoder", tiny_clip_dir, "--decoder", base, "--output-dir", out,
            "--epochs", "1", "--batch-size", "10", "--lr", "1e-3", "--no-progress")
    return decoder_type, base, out / "epoch-1"


@pytest.mark.slow
def test_train_builds_the_family_from_the_decoder_config_and_trains_only_the_cross_attention(trained):
    decoder_type, base, checkpoint = trained
    model = load_smallcap(checkpoint)  # our own format (safetensors) loads back
    assert model.config.decoder.model_type == decoder_type
    tokenizer_ids = {"this_opt": (4, 17), "this_xglm": (3253, 5)}[decoder_type]  # '!' and '.' of each vocabulary
    assert (model.config.pad_token_id, model.config.eos_token_id) == tokenizer_ids
    before = load_file(base / "model.safetensors")
    after = {name.removeprefix("decoder."): p for name, p in model.state_dict().items() if name.startswith("decoder.")}
    frozen = [name for name in before if name in after]
    assert len(frozen) > 10 and all(torch.equal(before[name], after[name]) for name in frozen)
    cross = [name for name in after if "encoder_attn" in name]
    assert cross and all(name not in before for name in cross)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"decoder.{n}" for n in cross}


@pytest.mark.slow
def test_caption_and_predict_with_the_trained_checkpoint(trained, coco, features, tmp_path):
    decoder_type, _, checkpoint = trained
    captioner = Captioner.from_pretrained(str(checkpoint))
    assert captioner.tokenizer.smallcap_prompt_start == 2  # prompts start with "</s>" as in the reference
    retrieved = json.loads(coco["retrieved"].read_text())
    expected = [r.caption for r in captioner([str(f) for f in coco["files"]],
                                            retrieved=[retrieved[str(int(f.stem))] for f in coco["files"]])]
    assert all(isinstance(c, str) for c in expected)

    out = tmp_path / "captions.jsonl"
    run_cli("caption", *coco["files"], "--model", checkpoint, "--retrieved", coco["retrieved"], "--output", out)
    assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == expected

    preds = tmp_path / "preds.json"
    run_cli("predict", coco["data"], "--images-dir", coco["images"], "--features", features, "--model", checkpoint,
            "--retrieved", coco["retrieved"], "--out", preds)
    by_id = {row["image_id"]: row["caption"] for row in json.loads(preds.read_text())}
    assert [by_id[int(f.stem)] for f in coco["files"]] == expected


@pytest.mark.slow
def test_serve_answers_with_the_trained_checkpoint(trained, coco):
    """`smallcap serve` loads the family through the same loader and answers over HTTP (real uvicorn) with the
    captions the Python API gives for the same images without retrieval."""
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'smallcap[serve]'")
    import httpx

    from serving_helpers import live_server, wait_ready
    from smallcap.serving.app import create_app
    from smallcap.serving.engine import Engine

    decoder_type, _, checkpoint = trained
    engine = Engine.load(str(checkpoint))
    expected = [r.caption for r in Captioner.from_pretrained(str(checkpoint), use_retrieval=False)(
        [str(f) for f in coco["files"]])]
    files = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in coco["files"]]
    app = create_app(lambda: engine, max_wait_ms=50)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        wait_ready(client)
        response = client.post("/v1/captions", files=files, data={"datastores": "none"})
        assert response.status_code == 200, response.text
        assert [r["caption"] for r in response.json()["results"]] == expected
        assert client.get("/v1/model").json()["name"] == str(checkpoint), decoder_type


def test_an_unsupported_family_fails_with_one_short_message(tmp_path, tiny_clip_dir):
    config = json.loads((OPT_PACK / "config.json").read_text())
    config["decoder"]["model_type"] = "this_bloom"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SmallCapError, match=r"unsupported SmallCap decoder 'this_bloom'; supported families: "
                                            r"GPT-2 \(gpt2\), OPT \(opt\), XGLM \(xglm\)$"):
        load_smallcap(tmp_path)
    result = run_cli("caption", OPT_PACK / "images", "--model", tmp_path, "--no-retrieval", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "supported families: GPT-2 (gpt2), OPT (opt), XGLM (xglm)" in result.stderr
    assert len(result.stderr) < 500

    bloom = tmp_path / "bloom"
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"model_type": "bloom", "n_layer": 1, "hidden_size": 64}))
    with pytest.raises(SmallCapError, match=r"is a 'bloom' model; supported families: GPT-2"):
        SmallCap.from_encoder_decoder_pretrained(str(tiny_clip_dir), str(bloom))


CLIP_B32_VISION = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=32)
REAL_DECODERS = {  # the published configs' sizes
    "gpt2": dict(model_type="this_gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
    "opt-125m": dict(model_type="this_opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     ffn_dim=3072, word_embed_proj_dim=768, vocab_size=50272),
    "opt-350m": dict(model_type="this_opt", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     ffn_dim=4096, word_embed_proj_dim=512, do_layer_norm_before=False, vocab_size=50272),
    "xglm-564M": dict(model_type="this_xglm", d_model=1024, num_layers=24, attention_heads=16, ffn_dim=4096,
                      vocab_size=256008),
}


@pytest.mark.parametrize("decoder, r, count", [
    ("gpt2", 4, 7_094_016), ("opt-125m", 4, 7_112_448), ("opt-350m", 4, 22_112_256), ("xglm-564M", 4, 22_112_256),
    ("opt-125m", 8, 3_570_048), ("xglm-564M", 16, 5_583_360),  # layers x (q + k + v + out + layer norm)
])
def test_trainable_parameters_at_real_size(decoder, r, count):
    """The reference's counts (packs' READMEs) at real size, built on the meta device (no memory, no weights)."""
    config = SmallCapConfig(encoder=CLIP_B32_VISION,
                            decoder={**REAL_DECODERS[decoder], "cross_attention_reduce_factor": r})
    with torch.device("meta"):
        model = SmallCap(config)
    assert model.num_trainable_parameters() == count
