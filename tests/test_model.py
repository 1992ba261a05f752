"""The SmallCap architecture: trainable parameters, decoders of other widths, checkpoints in and out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModel, CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from conftest import GOLDEN, GPT2_TOKENIZER_DIR
from smallcap.errors import SmallCapError
from smallcap.modeling import REDUCE_FACTORS, SmallCap, SmallCapConfig, load_smallcap

PUBLISHED_COUNTS = {1: 28_348_416, 2: 14_178_816, 4: 7_094_016, 8: 3_551_616, 16: 1_780_416}


def expected_trainable(hidden: int, layers: int, encoder_width: int, r: int) -> int:
    inner = hidden // r
    q_attn = hidden * inner + inner
    c_attn = encoder_width * 2 * inner + 2 * inner
    c_proj = inner * hidden + hidden
    return layers * (q_attn + c_attn + c_proj)


def build(decoder: GPT2Config, encoder: CLIPVisionConfig, r: int) -> SmallCap:
    config = SmallCapConfig(encoder=encoder.to_dict(),
                            decoder={**decoder.to_dict(), "model_type": "this_gpt2",
                                     "cross_attention_reduce_factor": r})
    return SmallCap(config)


@pytest.mark.parametrize("r", REDUCE_FACTORS)
def test_trainable_parameters_of_gpt2_small_with_vit_b32(r):
    with torch.device("meta"):  # real sizes, no memory
        model = build(GPT2Config(), CLIPVisionConfig(patch_size=32), r)
    assert model.num_trainable_parameters() == expected_trainable(768, 12, 768, r) == PUBLISHED_COUNTS[r]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".crossattention." in n and n.split(".")[-2] in ("c_attn", "q_attn", "c_proj") for n in trainable)
    assert not model.decoder.transformer.h[0].ln_cross_attn.weight.requires_grad
    block = model.decoder.transformer.h[0].crossattention
    assert tuple(block.c_attn.weight.shape) == (768, 2 * 768 // r)
    assert tuple(block.q_attn.weight.shape) == (768, 768 // r)
    assert tuple(block.c_proj.weight.shape) == (768 // r, 768)


def test_larger_decoder_takes_key_value_width_from_encoder():
    with torch.device("meta"):
        model = build(GPT2Config(n_embd=1024, n_layer=24, n_head=16), CLIPVisionConfig(patch_size=32), 4)
    block = model.decoder.transformer.h[0].crossattention
    assert tuple(block.c_attn.weight.shape) == (768, 2 * 256)  # gpt2-medium over ViT-B/32
    assert model.num_trainable_parameters() == expected_trainable(1024, 24, 768, 4)
    # A real forward with mismatched widths (decoder 96, encoder 64).
    tiny = build(GPT2Config(n_embd=96, n_layer=2, n_head=4), CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, patch_size=32), 2).eval()
    out = tiny(pixel_values=torch.randn(2, 3, 224, 224), decoder_input_ids=torch.tensor([[1, 2, 3]] * 2))
    assert out.logits.shape == (2, 3, 50257)
    assert not hasattr(tiny, "enc_to_dec_proj")


@pytest.fixture(scope="module")
def golden_model():
    return load_smallcap(GOLDEN)


def test_reference_checkpoint_round_trip_in_current_format(golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    again = load_smallcap(tmp_path)
    assert again.num_trainable_parameters() == 8416
    reference = golden_model.state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, reference[key]), key
    generic = AutoModel.from_pretrained(tmp_path)  # Auto-class registration
    assert isinstance(generic, SmallCap)
    # Checkpoints carry weights and config only: no copy of our code as remote code.
    assert not (tmp_path / "modeling.py").exists() and "auto_map" not in json.loads((tmp_path / "config.json").read_text())


def test_tiny_model_built_from_pretrained_parts_round_trips(tiny_clip_dir, tmp_path):
    decoder_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4)).save_pretrained(decoder_dir)
    model = SmallCap.from_encoder_decoder_pretrained(str(tiny_clip_dir), str(decoder_dir), cross_attention_reduce_factor=2)
    assert model.num_trainable_parameters() == expected_trainable(64, 2, 64, 2)
    pretrained_wte = GPT2LMHeadModel.from_pretrained(decoder_dir).transformer.wte.weight
    assert torch.equal(model.decoder.transformer.wte.weight, pretrained_wte)
    model.save_pretrained(tmp_path / "smallcap")
    again = load_smallcap(tmp_path / "smallcap")
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.tensor([[1212, 2939, 2523, 220]])
    with torch.no_grad():
        assert torch.equal(model.eval()(pixel_values=pixels, decoder_input_ids=ids).logits,
                           again(pixel_values=pixels, decoder_input_ids=ids).logits)


def _copy_golden(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(GOLDEN / name, target / name)
    return target


def test_unexpected_and_missing_keys_are_errors(tmp_path):
    target = _copy_golden(tmp_path)
    state = torch.load(target / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "decoder.transformer.h.0.surprise.weight": torch.zeros(1)}, target / "pytorch_model.bin")
    with pytest.raises(SmallCapError, match="unexpected keys.*surprise"):
        load_smallcap(target)
    del state["decoder.transformer.h.1.crossattention.q_attn.weight"]
    torch.save(state, target / "pytorch_model.bin")
    with pytest.raises(SmallCapError, match="missing keys.*q_attn"):
        load_smallcap(target)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_never_runs_code(tmp_path, capsys):
    target = _copy_golden(tmp_path)
    torch.save({"x": _Payload()}, target / "pytorch_model.bin")
    with pytest.raises(SmallCapError, match="cannot read the checkpoint"):
        load_smallcap(target)
    assert "code ran" not in capsys.readouterr().out


def test_wrong_or_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(SmallCapError, match="does not exist"):
        load_smallcap(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmallCapError, match="no config.json"):
        load_smallcap(tmp_path / "empty")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    with pytest.raises(SmallCapError, match="not a SmallCap model"):
        load_smallcap(gpt2)


def test_tokenizer_conventions():
    from smallcap.prompt import load_tokenizer

    tokenizer = load_tokenizer(str(GPT2_TOKENIZER_DIR))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 13)
    assert tokenizer.encode("a man riding a horse.") == [64, 582, 10311, 257, 8223, 13]
    # Pad and end are plain BPE text, as with the reference: ".." and "!!" are single tokens.
    for source in (GPT2_TOKENIZER_DIR, GOLDEN):
        tokenizer = load_tokenizer(str(source))
        assert tokenizer.encode("a bike..") == [64, 7161, 492] and tokenizer.encode("wow!!") == [42773, 3228]
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 13)
    assert isinstance(GPT2Tokenizer.from_pretrained(GPT2_TOKENIZER_DIR), GPT2Tokenizer)
