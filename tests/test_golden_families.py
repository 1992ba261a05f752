"""Parity with the reference SmallCap on its OPT (`ref-opt-r4`) and XGLM (`ref-xglm-r8`) golden packs.

Each pack is loaded once per module (the fixture is module-scoped and parametrized over packs); image-level
checks use a few images where the whole pack adds no coverage.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutput

from conftest import SHARED, run_cli
from golden import Pack
from smallcap.captioner import Captioner
from smallcap.generation import GenerationSettings, generate
from smallcap.modeling import load_smallcap
from smallcap.prompt import collate_training_examples, prompt_ids, training_example

PACKS = {"opt": SHARED / "golden" / "ref-opt-r4", "xglm": SHARED / "golden" / "ref-xglm-r8"}
FEW = 3  # images for the checks that run the encoder one image at a time


@pytest.fixture(scope="module", params=sorted(PACKS))
def pack(request) -> Pack:
    return Pack(PACKS[request.param])


@pytest.fixture(scope="module")
def captioner(pack):
    torch.set_num_threads(1)
    return Captioner.from_pretrained(str(pack.root))


@pytest.fixture(scope="module")
def encoder_states(pack):
    return torch.tensor(pack.expected("encoder_last_hidden_state.npy"))


def test_checkpoint_loads_as_its_family_with_the_reference_trainable_parameters(pack, captioner):
    model = captioner.model
    assert model.config.decoder.model_type == pack.decoder_type
    assert (model.config.pad_token_id, model.config.eos_token_id) == (
        (4, 17) if pack.decoder_type == "this_opt" else (3253, 5))
    # The reference's substring rule trains `encoder_attn_layer_norm` too (27,056 / 53,728 in the READMEs).
    assert model.num_trainable_parameters() == {"this_opt": 53_728, "this_xglm": 27_056}[pack.decoder_type]
    trainable = {name.rsplit(".", 2)[-2] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"k_proj", "v_proj", "q_proj", "out_proj", "encoder_attn_layer_norm"}


def test_saved_in_our_format_and_loaded_back_unchanged(pack, captioner, encoder_states, tmp_path):
    captioner.model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = load_smallcap(tmp_path)
    assert reloaded.config.decoder.model_type == pack.decoder_type
    original = captioner.model.state_dict()
    assert reloaded.state_dict().keys() == original.keys()
    assert all(torch.equal(value, original[key]) for key, value in reloaded.state_dict().items())
    assert reloaded.num_trainable_parameters() == captioner.model.num_trainable_parameters()
    prompt = prompt_ids(captioner.tokenizer, pack.retrieved()[0])
    assert (generate(reloaded, [prompt], encoder_hidden_states=encoder_states[:1])
            == [pack.expected("gen_rag_beam3_encoder_outputs.json")["per_image"][0]["new_ids"]])


def test_pixels_and_encoder_states(pack, captioner):
    images = [Image.open(p) for p in pack.image_paths()[:FEW]]
    pixels = captioner.pixel_values(images)
    assert np.array_equal(pixels.numpy(), pack.expected("pixel_values.npy")[:FEW])
    with torch.no_grad():
        states = torch.cat([captioner.model.encoder(pixel_values=pixels[i:i + 1]).last_hidden_state
                            for i in range(FEW)])
    np.testing.assert_allclose(states.numpy(), pack.expected("encoder_last_hidden_state.npy")[:FEW], atol=1e-5)


def test_prompt_ids_start_with_the_reference_bos(pack, captioner):
    prompts = pack.expected("prompts.json")
    assert prompts["bos_prepended"]
    for row, caps in zip(prompts["per_image"], pack.retrieved()):
        assert prompt_ids(captioner.tokenizer, caps, k=4) == row["prompt_ids"]
        assert row["prompt_ids"][0] == 2  # "</s>"
    assert prompt_ids(captioner.tokenizer, None) == prompts["norag_prompt_ids"]


@pytest.fixture(scope="module")
def training_batch(pack, captioner):
    targets = pack.load_json("target_captions.json")
    examples = [training_example(captioner.tokenizer, targets[i], caps, k=4)
                for i, caps in zip(pack.image_ids(), pack.retrieved())]
    width = pack.expected("train_decoder_input_ids.npy").shape[1]  # the reference's fixed length T
    return collate_training_examples(examples, pad_to=width, pad_token_id=captioner.tokenizer.pad_token_id)


def test_training_ids_and_labels(pack, training_batch):
    input_ids, labels = training_batch
    assert np.array_equal(input_ids.numpy(), pack.expected("train_decoder_input_ids.npy"))
    assert np.array_equal(labels.numpy(), pack.expected("train_labels.npy"))


def test_training_forward_logits_and_losses(pack, captioner, training_batch, encoder_states):
    input_ids, labels = training_batch
    with torch.no_grad():
        out = captioner.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
                              decoder_input_ids=input_ids, labels=labels)
    logits = out.logits
    np.testing.assert_allclose(logits[..., :256].numpy(), pack.expected("train_logits_vocab0-255.npy"), atol=1e-4)
    top5 = torch.topk(logits, 5)
    np.testing.assert_allclose(top5.values.numpy(), pack.expected("train_top5_values.npy"), atol=1e-4)
    same_ids = top5.indices.numpy() == pack.expected("train_top5_ids.npy")
    near_ties = pack.load_json("fixture.json")["reference_checks"]["train_top5_near_ties"]["positions"]
    for row, position, _gap in near_ties:  # two logits within 5e-5: their ranks may swap under float noise
        same_ids[row, position] = True
    assert same_ids.all()
    np.testing.assert_allclose(torch.logsumexp(logits, -1).numpy(), pack.expected("train_logsumexp.npy"), atol=1e-5)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    np.testing.assert_allclose(nll.numpy(), pack.expected("train_token_nll.npy"), atol=1e-5)
    forward = pack.expected("train_forward.json")
    assert out.loss.item() == pytest.approx(forward["batch_loss"], abs=1e-5)
    per_example = (nll.sum(1) / (labels != -100).sum(1)).tolist()
    assert per_example == pytest.approx(forward["per_example_loss"], abs=1e-5)


def test_training_loss_equals_the_reference_batch_loss(pack, captioner, training_batch, encoder_states):
    """`smallcap train`'s loss (LM head at label positions only) on this family's decoder."""
    from smallcap.training import training_loss

    input_ids, labels = training_batch
    with torch.no_grad():
        loss = training_loss(captioner.model, {"encoder_hidden_states": encoder_states,
                                               "decoder_input_ids": input_ids, "labels": labels})
    assert loss.item() == pytest.approx(pack.expected("train_forward.json")["batch_loss"], abs=1e-5)


@pytest.mark.parametrize("name, num_beams", [("gen_rag_beam3.json", 3), ("gen_rag_greedy.json", 1)])
def test_generated_ids_one_image_at_a_time_from_pixels(pack, captioner, name, num_beams):
    pixels = torch.tensor(pack.expected("pixel_values.npy"))
    settings = GenerationSettings(num_beams=num_beams)
    for i, (row, caps) in enumerate(zip(pack.expected(name)["per_image"][:FEW], pack.retrieved())):
        prompt = prompt_ids(captioner.tokenizer, caps)
        assert len(prompt) == row["prompt_len"]
        new = generate(captioner.model, [prompt], pixel_values=pixels[i:i + 1], settings=settings)[0]
        assert prompt + new == row["output_ids"]


@pytest.mark.parametrize("name, num_beams", [("gen_rag_beam3_encoder_outputs.json", 3), ("gen_rag_greedy.json", 1)])
def test_batched_left_padded_decoding_equals_one_image_at_a_time(pack, captioner, encoder_states, name, num_beams):
    """Prompts differ in length: the batch is left-padded, and OPT must shift its learned positions."""
    expected = [row["new_ids"] for row in pack.expected(name)["per_image"]]
    prompts = [prompt_ids(captioner.tokenizer, caps) for caps in pack.retrieved()]
    assert len(set(map(len, prompts))) > 1
    settings = GenerationSettings(num_beams=num_beams)
    batched = generate(captioner.model, prompts, encoder_hidden_states=encoder_states, settings=settings)
    assert batched == expected
    alone = [generate(captioner.model, [prompt], encoder_hidden_states=encoder_states[i:i + 1], settings=settings)[0]
             for i, prompt in enumerate(prompts)]
    assert alone == batched


def test_no_retrieval_beam_batch(pack, captioner):
    pixels = torch.tensor(pack.expected("pixel_values.npy"))
    prompts = [prompt_ids(captioner.tokenizer, None)] * len(pixels)
    new = generate(captioner.model, prompts, pixel_values=pixels)
    # The reference right-pads finished rows with the top-level pad ('!') after their end token.
    expected_ids = pack.expected("gen_norag_beam3_output_ids.npy")
    width, pad = expected_ids.shape[1], captioner.model.config.pad_token_id
    padded = [prompts[0] + ids + [pad] * (width - len(prompts[0]) - len(ids)) for ids in new]
    assert np.array_equal(np.array(padded), expected_ids)


def test_captions_through_python_api(pack, captioner):
    results = captioner([str(p) for p in pack.image_paths()], retrieved=pack.retrieved(), batch_size=4)
    assert [r.caption for r in results] == pack.expected_captions("gen_rag_beam3.json")
    no_retrieval = Captioner(captioner.model, captioner.tokenizer, captioner.image_processor, use_retrieval=False)
    results = no_retrieval([str(p) for p in pack.image_paths()], batch_size=6)
    assert [r.caption for r in results] == pack.expected_captions("gen_norag_beam3.json")


@pytest.mark.slow
def test_captions_through_cli(pack, tmp_path):
    out = tmp_path / "captions.jsonl"
    run_cli("caption", pack.root / "images", "--model", pack.root, "--batch-size", "3", "--num-beams", "1",
            "--retrieved", pack.root / "retrieved_caps.json", "--output", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == [p.name for p in pack.image_paths()]
    assert [r["caption"] for r in rows] == pack.expected_captions("gen_rag_greedy.json")
