"""Parity with the reference SmallCap implementation on the golden pack `ref-r4` (real COCO images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

import golden
from conftest import GOLDEN, run_cli
from smallcap.captioner import Captioner
from smallcap.generation import GenerationSettings, generate
from smallcap.prompt import (NO_RETRIEVAL_PROMPT, TEMPLATE, collate_training_examples, prompt_ids,
                             training_example)


@pytest.fixture(scope="module")
def captioner():
    return Captioner.from_pretrained(str(GOLDEN))


@pytest.fixture(scope="module")
def encoder_states():
    return torch.tensor(golden.expected("encoder_last_hidden_state.npy"))


def test_image_preprocessing_is_bit_identical(captioner):
    from PIL import Image

    pixels = captioner.pixel_values([Image.open(p) for p in golden.image_paths()]).numpy()
    assert np.array_equal(pixels, golden.expected("pixel_values.npy"))


def test_encoder_states_match(captioner):
    pixels = torch.tensor(golden.expected("pixel_values.npy"))
    with torch.no_grad():
        states = torch.cat([captioner.model.encoder(pixel_values=pixels[i:i + 1]).last_hidden_state
                            for i in range(len(pixels))])
    np.testing.assert_allclose(states.numpy(), golden.expected("encoder_last_hidden_state.npy"), atol=1e-5)


def test_prompts_and_prompt_ids(captioner):
    prompts = golden.expected("prompts.json")
    assert TEMPLATE == prompts["template"]
    for expected_row, caps in zip(prompts["per_image"], golden.retrieved()):
        assert prompt_ids(captioner.tokenizer, caps, k=4) == expected_row["prompt_ids"]
    assert captioner.tokenizer.encode(NO_RETRIEVAL_PROMPT) == [1212, 2939, 2523, 220]
    assert prompt_ids(captioner.tokenizer, None) == [1212, 2939, 2523, 220]


@pytest.fixture(scope="module")
def training_batch(captioner):
    targets = golden.load_json("target_captions.json")
    examples = [training_example(captioner.tokenizer, targets[i], caps, k=4)
                for i, caps in zip(golden.image_ids(), golden.retrieved())]
    return collate_training_examples(examples, pad_to=140)  # the reference's fixed length T for k=4


def test_training_ids_and_labels(training_batch):
    input_ids, labels = training_batch
    assert np.array_equal(input_ids.numpy(), golden.expected("train_decoder_input_ids.npy"))
    assert np.array_equal(labels.numpy(), golden.expected("train_labels.npy"))


def test_training_forward_logits_and_losses(captioner, training_batch, encoder_states):
    input_ids, labels = training_batch
    model = captioner.model.eval()
    with torch.no_grad():
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                    decoder_input_ids=input_ids, labels=labels)
    logits = out.logits
    np.testing.assert_allclose(logits[..., :256].numpy(), golden.expected("train_logits_vocab0-255.npy"), atol=1e-4)
    top5 = torch.topk(logits, 5)
    np.testing.assert_allclose(top5.values.numpy(), golden.expected("train_top5_values.npy"), atol=1e-4)
    assert np.array_equal(top5.indices.numpy(), golden.expected("train_top5_ids.npy"))
    np.testing.assert_allclose(torch.logsumexp(logits, -1).numpy(), golden.expected("train_logsumexp.npy"), atol=1e-5)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    np.testing.assert_allclose(nll.numpy(), golden.expected("train_token_nll.npy"), atol=1e-5)
    forward = golden.expected("train_forward.json")
    assert out.loss.item() == pytest.approx(forward["batch_loss"], abs=1e-5)
    per_example = (nll.sum(1) / (labels != -100).sum(1)).tolist()
    assert per_example == pytest.approx(forward["per_example_loss"], abs=1e-5)


@pytest.mark.parametrize("name, num_beams", [("gen_rag_beam3.json", 3), ("gen_rag_greedy.json", 1)])
def test_generated_ids_one_image_at_a_time_from_pixels(captioner, name, num_beams):
    pixels = torch.tensor(golden.expected("pixel_values.npy"))
    settings = GenerationSettings(num_beams=num_beams)
    for i, (row, caps) in enumerate(zip(golden.expected(name)["per_image"], golden.retrieved())):
        prompt = prompt_ids(captioner.tokenizer, caps)
        assert len(prompt) == row["prompt_len"]
        new = generate(captioner.model, [prompt], pixel_values=pixels[i:i + 1], settings=settings)[0]
        assert prompt + new == row["output_ids"]


def test_generated_ids_from_encoder_outputs_batched(captioner, encoder_states):
    expected = golden.expected("gen_rag_beam3_encoder_outputs.json")["per_image"]
    prompts = [prompt_ids(captioner.tokenizer, caps) for caps in golden.retrieved()]
    new = generate(captioner.model, prompts, encoder_hidden_states=encoder_states)
    assert new == [row["new_ids"] for row in expected]


def test_no_retrieval_beam_batch(captioner):
    pixels = torch.tensor(golden.expected("pixel_values.npy"))
    prompts = [prompt_ids(captioner.tokenizer, None)] * 6
    new = generate(captioner.model, prompts, pixel_values=pixels)
    # The reference right-pads finished rows with pad 0 after their end token 13.
    expected_ids = golden.expected("gen_norag_beam3_output_ids.npy")
    width = expected_ids.shape[1]
    padded = [prompts[0] + ids + [0] * (width - 4 - len(ids)) for ids in new]
    assert np.array_equal(np.array(padded), expected_ids)


@pytest.mark.parametrize("name, kwargs", [
    ("gen_rag_beam3.json", {}),
    ("gen_rag_greedy.json", {"settings": GenerationSettings(num_beams=1)}),
    ("gen_norag_beam3.json", {"use_retrieval": False}),
])
def test_captions_through_python_api(name, kwargs):
    captioner = Captioner.from_pretrained(str(GOLDEN), **kwargs)
    retrieved = golden.retrieved() if captioner.use_retrieval else None
    results = captioner([str(p) for p in golden.image_paths()], retrieved=retrieved, batch_size=4)
    assert [r.caption for r in results] == golden.expected_captions(name)
    if retrieved:
        assert [r.retrieved for r in results] == [caps[:4] for caps in retrieved]


@pytest.mark.parametrize("name, flags", [
    ("gen_rag_beam3.json", ["--retrieved", str(GOLDEN / "retrieved_caps.json")]),
    ("gen_rag_greedy.json", ["--retrieved", str(GOLDEN / "retrieved_caps.json"), "--num-beams", "1"]),
    ("gen_norag_beam3.json", ["--no-retrieval"]),
])
@pytest.mark.slow
def test_captions_through_cli(tmp_path, name, flags):
    out = tmp_path / "captions.jsonl"
    run_cli("caption", GOLDEN / "images", "--model", GOLDEN, "--batch-size", "3", "--output", out, *flags)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == [p.name for p in golden.image_paths()]
    assert [r["caption"] for r in rows] == golden.expected_captions(name)
