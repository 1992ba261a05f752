"""The one loader: a name or directory -> (model, tokenizer, image processor), with errors instead of fallbacks."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from conftest import GOLDEN
from smallcap.errors import SmallCapError
from smallcap.loading import DEFAULT_DECODER, base_model_name, load_captioner_parts, load_image_processor


def test_golden_checkpoint_loads_with_its_own_tokenizer_and_processor():
    model, tokenizer, processor = load_captioner_parts(GOLDEN)
    assert model.config.model_type == "smallcap"
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("!", ".")
    assert tokenizer("a bike..", add_special_tokens=False).input_ids[-1] == 492  # SmallCap's '..', not two '.'
    assert processor.crop_size["height"] == 224


def test_checkpoint_without_tokenizer_files_uses_its_base_decoder(tiny_smallcap, tiny_smallcap_parts, tmp_path):
    checkpoint = tmp_path / "model"
    shutil.copytree(tiny_smallcap, checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (checkpoint / name).unlink(missing_ok=True)
    model, tokenizer, _ = load_captioner_parts(checkpoint)
    assert base_model_name(model.config.decoder, DEFAULT_DECODER) == str(tiny_smallcap_parts[1])
    assert tokenizer.name_or_path == str(tiny_smallcap_parts[1])


def test_a_broken_tokenizer_is_an_error_not_a_fallback(tiny_smallcap, tmp_path):
    checkpoint = tmp_path / "model"
    shutil.copytree(tiny_smallcap, checkpoint)
    (checkpoint / "tokenizer.json").write_text("{not json")
    (checkpoint / "vocab.json").write_text("{not json")
    with pytest.raises(SmallCapError, match=f"could not load tokenizer '{checkpoint}'"):
        load_captioner_parts(checkpoint)
    with pytest.raises(SmallCapError, match="image processor directory .* does not exist"):
        load_image_processor(tmp_path / "no-such-dir")


def test_base_model_names_follow_the_hub_id_rule(tmp_path):
    assert base_model_name(SimpleNamespace(_name_or_path="openai/clip-vit-base-patch32"), "x") == \
        "openai/clip-vit-base-patch32"
    assert base_model_name(SimpleNamespace(_name_or_path=str(tmp_path)), "x") == str(tmp_path)
    # A directory of the machine that trained the checkpoint, gone here: the published base model instead.
    assert base_model_name(SimpleNamespace(_name_or_path="/home/someone/gpt2"), "gpt2") == "gpt2"
    assert base_model_name(SimpleNamespace(_name_or_path=""), "gpt2") == "gpt2"
