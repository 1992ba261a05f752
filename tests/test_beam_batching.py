"""Continuous batching for beam search (`smallcap.beam_batching`) gives the tokens transformers' `generate` gives:
on the bundled `mini` model with real COCO images and retrieved captions, and on a tiny random model whose '.' row
is boosted so captions end at different steps; with fewer images in flight than images (so finished images are
replaced by waiting ones), other beam counts, a length penalty and a shorter token limit. (The golden pack's
generation tests in test_golden.py run through it too, since `generate` uses it for GPT-2 decoders.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, GPT2Config

from conftest import COCO_MINI, COCO_VAL_CAPTIONS
from smallcap.beam_batching import packed_lm_head, supports_continuous_batching
from smallcap.captioner import Captioner
from smallcap.generation import GenerationSettings, generate, generate_with_transformers
from smallcap.images import load_image
from smallcap.modeling import END_TOKEN_ID, SmallCap, SmallCapConfig
from smallcap.prompt import load_tokenizer, prompt_ids

IMAGES = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:16]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_inputs():
    """The mini model, its prompts (k=4 captions retrieved from mini-source) and encoder states for 16 real images."""
    torch.set_num_threads(1)
    captioner = Captioner.from_pretrained("mini", datastores=["mini-source"])
    images = [load_image(path) for path in IMAGES]
    states = captioner.encode(images)
    retrieved = captioner.retriever(images, states, captioner.k)
    prompts = [prompt_ids(captioner.tokenizer, caps, captioner.k) for caps in retrieved]
    return captioner.model, prompts, states


def test_mini_model_captions_are_identical_to_transformers_generate(mini_inputs):
    model, prompts, states = mini_inputs
    expected = generate_with_transformers(model, prompts, states)
    assert len({len(ids) for ids in expected}) > 1, "captions of different lengths, so images finish at different steps"
    assert supports_continuous_batching(model, GenerationSettings())
    assert generate(model, prompts, encoder_hidden_states=states) == expected
    assert generate(model, prompts, encoder_hidden_states=states, max_in_flight=5) == expected


@pytest.fixture(scope="module")
def tiny_boosted():
    """A tiny random SmallCap with the '.' embedding row x3 (captions of 1 to 25 tokens) and 12 real prompts."""
    torch.manual_seed(0)
    config = SmallCapConfig(
        encoder=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 patch_size=32).to_dict(),
        decoder={**GPT2Config(n_embd=64, n_layer=2, n_head=4).to_dict(), "model_type": "this_gpt2",
                 "cross_attention_reduce_factor": 4})
    model = SmallCap(config).eval()
    with torch.no_grad():
        model.decoder.transformer.wte.weight[END_TOKEN_ID] *= 3
    tokenizer = load_tokenizer(str(COCO_MINI.parent / "tokenizers" / "gpt2"))
    annotations = json.loads(COCO_VAL_CAPTIONS.read_text())["annotations"]
    captions = [a["caption"].strip() for a in sorted(annotations, key=lambda a: a["id"])[:48]]
    prompts = [prompt_ids(tokenizer, captions[4 * i:4 * i + 4 - i % 3], 4) for i in range(12)]
    states = torch.randn(len(prompts), 50, 64, generator=torch.Generator().manual_seed(1))
    return model, prompts, states


@pytest.mark.parametrize("settings, in_flight", [
    (GenerationSettings(), None),
    (GenerationSettings(), 1),
    (GenerationSettings(), 4),
    (GenerationSettings(num_beams=2, max_new_tokens=9), 5),
    (GenerationSettings(num_beams=4, length_penalty=1.0), 3),
    (GenerationSettings(num_beams=1), 4),
])
def test_tiny_model_tokens_are_identical_to_transformers_generate(tiny_boosted, settings, in_flight):
    model, prompts, states = tiny_boosted
    expected = generate_with_transformers(model, prompts, states, settings)
    if settings.max_new_tokens == 25 and settings.num_beams == 3:
        assert len({len(ids) for ids in expected}) >= 4, "the boost makes captions end at different steps"
    assert generate(model, prompts, encoder_hidden_states=states, settings=settings, max_in_flight=in_flight) == expected


def test_other_settings_go_through_transformers(tiny_boosted):
    model, prompts, states = tiny_boosted
    settings = GenerationSettings(early_stopping=False)
    assert not supports_continuous_batching(model, settings)
    assert (generate(model, prompts[:3], encoder_hidden_states=states[:3], settings=settings)
            == generate_with_transformers(model, prompts[:3], states[:3], settings))


def test_bad_arguments_are_refused(tiny_boosted):
    model, prompts, states = tiny_boosted
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [prompts[0], []], encoder_hidden_states=states[:2])
    with pytest.raises(ValueError, match="max_in_flight must be at least 1"):
        generate(model, prompts[:2], encoder_hidden_states=states[:2], max_in_flight=0)


def test_packed_lm_head_computes_the_heads_logits():
    head = torch.nn.Linear(64, 300, bias=False)
    hidden = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    packed = packed_lm_head(head, rows=6)
    assert packed is not head, "a float32 linear head on CPU is packed"
    with torch.inference_mode():
        torch.testing.assert_close(packed(hidden), head(hidden), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed(hidden[:2]), head(hidden[:2]), rtol=1e-5, atol=1e-5)  # fewer rows too
    bfloat16_head = torch.nn.Linear(64, 300, bias=False).to(torch.bfloat16)
    assert packed_lm_head(bfloat16_head, rows=6) is bfloat16_head


def test_a_torch_without_the_packing_ops_decodes_with_the_plain_head(monkeypatch):
    """The packing uses private oneDNN ops; a torch build that lacks them gets the head as it is, not an error."""
    import smallcap.beam_batching as beam_batching

    def missing(*args, **kwargs):
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")

    monkeypatch.setattr(beam_batching.PackedLinear, "__init__", missing)
    head = torch.nn.Linear(64, 300, bias=False)
    assert packed_lm_head(head, rows=6) is head
