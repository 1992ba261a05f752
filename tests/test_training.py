"""Training on real COCO images and captions with a tiny SmallCap: golden loss parity, what changes, resume,
two processes, and input errors that stop a run before its first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, GOLDEN, REPO, coco_training_files, run_cli
from safetensors.torch import load_file

from smallcap.errors import SmallCapError
from smallcap.prompt import load_tokenizer
from smallcap.training import TrainingConfig, read_log, train, training_loss
from smallcap.training_data import CaptionDataset, TrainingSample, collate_batch, read_training_samples

N_IMAGES = 8  # x 5 captions = 40 samples: 4 steps of 10 per epoch


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The first real coco-mini train images and their retrieved captions (`conftest.coco_training_files`)."""
    return coco_training_files(tmp_path_factory.mktemp("coco"), N_IMAGES)


def _config(coco, parts, output_dir, **overrides):
    clip_dir, gpt2_dir = parts
    options = dict(data=str(coco["data"]), images=str(coco["images"]), retrieved=str(coco["retrieved"]),
                   encoder=str(clip_dir), decoder=str(gpt2_dir), output_dir=str(output_dir),
                   features=str(coco["dir"] / "features"), epochs=2, batch_size=10, lr=1e-3, progress=False)
    return TrainingConfig(**{**options, **overrides})


def _initial_model(parts):
    from accelerate.utils import set_seed

    from smallcap.modeling import SmallCap

    set_seed(42)  # train() builds its new model right after seeding with the run's seed
    return SmallCap.from_encoder_decoder_pretrained(str(parts[0]), str(parts[1]), 4)


@pytest.fixture(scope="module")
def run(coco, tiny_smallcap_parts, tmp_path_factory):
    """One training run: 2 epochs x 4 steps, a checkpoint every 3 steps and per epoch."""
    output_dir = tmp_path_factory.mktemp("run")
    final = train(_config(coco, tiny_smallcap_parts, output_dir, save_every_steps=3))
    return output_dir, final


def golden_training_batch() -> dict[str, torch.Tensor]:
    """The golden pack's training batch (its images, target captions and retrieved captions, k=4), collated."""
    ids = sorted(json.loads((GOLDEN / "images.json").read_text()), key=int)
    targets = json.loads((GOLDEN / "target_captions.json").read_text())
    retrieved = json.loads((GOLDEN / "retrieved_caps.json").read_text())
    states = np.load(GOLDEN / "expected" / "encoder_last_hidden_state.npy")
    samples = [TrainingSample(image_id, targets[image_id]) for image_id in ids]
    dataset = CaptionDataset(samples, dict(zip(ids, states)), load_tokenizer(str(GOLDEN)), retrieved, k=4)
    return collate_batch([dataset[i] for i in range(len(ids))])


def test_golden_batch_and_loss_equal_the_reference():
    from smallcap.modeling import load_smallcap

    batch = golden_training_batch()

    width = batch["decoder_input_ids"].shape[1]
    assert width == 77  # padded to the longest example, not to the reference's fixed budget of 140
    pad = lambda t, value: torch.nn.functional.pad(t, (0, 140 - width), value=value).numpy()  # noqa: E731
    np.testing.assert_array_equal(pad(batch["decoder_input_ids"], 0),
                                  np.load(GOLDEN / "expected" / "train_decoder_input_ids.npy"))
    np.testing.assert_array_equal(pad(batch["labels"], -100), np.load(GOLDEN / "expected" / "train_labels.npy"))

    expected = json.loads((GOLDEN / "expected" / "train_forward.json").read_text())
    model = load_smallcap(GOLDEN).eval()  # the reference computed these in eval mode
    with torch.no_grad():
        assert abs(training_loss(model, batch).item() - expected["batch_loss"]) < 1e-5
        for row, reference in enumerate(expected["per_example_loss"]):
            one = {key: value[row:row + 1] for key, value in batch.items()}
            assert abs(training_loss(model, one).item() - reference) < 1e-5


def test_label_position_loss_equals_the_full_forward_loss_and_gradients():
    """training_loss runs the LM head at label positions only: same loss and gradients as the stock forward."""
    from transformers.modeling_outputs import BaseModelOutput

    from smallcap.modeling import load_smallcap

    batch = golden_training_batch()
    model = load_smallcap(GOLDEN).eval()
    model.freeze_for_training()
    trainable = [p for p in model.parameters() if p.requires_grad]

    full = model(encoder_outputs=BaseModelOutput(last_hidden_state=batch["encoder_hidden_states"]),
                 decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"]).loss
    full_grads = torch.autograd.grad(full, trainable)
    sparse = training_loss(model, batch)
    sparse_grads = torch.autograd.grad(sparse, trainable)
    assert abs(sparse.item() - full.item()) < 1e-6
    for a, b in zip(sparse_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # Token weighting: the summed loss over a given token count (what each of N processes contributes).
    tokens = (batch["labels"] != -100).sum()
    with torch.no_grad():
        assert training_loss(model, batch, tokens * 2).item() == pytest.approx(full.item() / 2, abs=1e-6)


@pytest.mark.slow
def test_training_lowers_the_loss_and_changes_only_the_cross_attention(run, coco, tiny_smallcap_parts):
    from smallcap.features import FeatureCache
    from smallcap.modeling import load_smallcap

    output_dir, final = run
    assert final == output_dir / "epoch-2"
    assert sorted(p.name for p in output_dir.iterdir() if p.is_dir()) == ["epoch-1", "epoch-2", "step-3",
                                                                          "step-6"]
    log = read_log(output_dir)
    assert [record["step"] for record in log] == list(range(1, 9))
    assert log[0]["lr"] == 1e-3 and log[-1]["lr"] == pytest.approx(1.25e-4)  # linear decay, no warm-up

    initial, trained = _initial_model(tiny_smallcap_parts), load_smallcap(final)
    before, after = initial.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    cross = sorted(name for name in before if ".crossattention." in name)
    assert changed == cross and len(cross) == 12  # 2 layers x {q_attn, c_attn, c_proj} x {weight, bias}

    # Mean loss over every training sample, dropout off: lower after training.
    samples = read_training_samples(coco["data"], coco["images"])
    dataset = CaptionDataset(samples, FeatureCache(coco["dir"] / "features"), load_tokenizer(str(final)),
                             json.loads(coco["retrieved"].read_text()), k=4)
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        loss_before, loss_after = training_loss(initial.eval(), batch).item(), training_loss(trained, batch).item()
    assert loss_after < loss_before - 0.02, (loss_before, loss_after)


@pytest.mark.slow
def test_checkpoint_is_a_complete_model_directory(run, tiny_smallcap_parts):
    from transformers import AutoImageProcessor

    from smallcap.modeling import load_smallcap

    _, final = run
    model = load_smallcap(final)
    assert model.config.k == 4 and model.config.rag is True
    assert AutoImageProcessor.from_pretrained(final).crop_size == {"height": 224, "width": 224}
    # The tokenizer saved with the checkpoint encodes like the decoder's own (".." stays one token).
    text = "A dog on a bed.. This image shows "
    assert load_tokenizer(str(final)).encode(text) == load_tokenizer(str(tiny_smallcap_parts[1])).encode(text)
    state = json.loads((final / "training_state" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["num_processes"] == 1


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(run, coco, tiny_smallcap_parts, tmp_path):
    output_dir, final = run
    resumed = train(_config(coco, tiny_smallcap_parts, tmp_path, save_every_steps=3,
                            resume=str(output_dir / "step-3")))  # mid-epoch 1, as if killed after step 3
    expected, got = load_file(final / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert read_log(tmp_path) == read_log(output_dir)[3:]


@pytest.mark.slow
def test_two_processes_train_one_model(run, coco, tiny_smallcap_parts, tmp_path):
    from smallcap.modeling import load_smallcap

    clip_dir, gpt2_dir = tiny_smallcap_parts
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "smallcap", "train",
         coco["data"], "--retrieved", coco["retrieved"], "--features", coco["dir"] / "features",
         "--encoder", clip_dir, "--decoder", gpt2_dir, "--output-dir", tmp_path / "ddp", "--epochs", "1",
         "--batch-size", "10", "--lr", "1e-3", "--sample-k-from-7", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(tmp_path / "ddp" / "epoch-1")]  # printed once, by the main process
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["epoch-1", "train_log.jsonl"]
    assert [record["step"] for record in read_log(tmp_path / "ddp")] == [1, 2, 3, 4]
    state = json.loads((tmp_path / "ddp" / "epoch-1" / "training_state" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    trained, initial = load_smallcap(tmp_path / "ddp" / "epoch-1").state_dict(), _initial_model(tiny_smallcap_parts).state_dict()
    assert not torch.equal(trained["decoder.transformer.h.0.crossattention.c_attn.weight"],
                           initial["decoder.transformer.h.0.crossattention.c_attn.weight"])
    assert torch.equal(trained["decoder.transformer.h.0.mlp.c_fc.weight"], initial["decoder.transformer.h.0.mlp.c_fc.weight"])


@pytest.mark.slow
def test_cli_trains_from_images_without_retrieval(coco, tiny_smallcap_parts, tmp_path):
    clip_dir, gpt2_dir = tiny_smallcap_parts
    result = run_cli("train", coco["data"], "--images", coco["images"], "--no-retrieval", "--encoder", clip_dir,
                     "--decoder", gpt2_dir, "--output-dir", tmp_path / "out", "--epochs", "1", "--batch-size", "20",
                     "--gradient-accumulation-steps", "2", "--mixed-precision", "bf16")
    assert result.stdout.split() == [str(tmp_path / "out" / "epoch-1")]
    assert len(list((tmp_path / "out" / "features").glob("shard-*.npy"))) == 1  # extracted on the fly
    assert [record["step"] for record in read_log(tmp_path / "out")] == [1, 2]  # 40 samples / 20 per step
    config = json.loads((tmp_path / "out" / "epoch-1" / "config.json").read_text())
    assert config["rag"] is False
    state = json.loads((tmp_path / "out" / "epoch-1" / "training_state" / "trainer_state.json").read_text())
    assert state["options"]["mixed_precision"] == "bf16"


def test_batches_are_padded_to_their_longest_example_without_retrieval(coco, tiny_smallcap_parts):
    samples = read_training_samples(coco["data"], coco["images"])[:8]
    tokenizer = load_tokenizer(str(tiny_smallcap_parts[1]))
    features = {s.image_id: np.zeros((50, 64), np.float32) for s in samples}
    items = [CaptionDataset(samples, features, tokenizer, None)[i] for i in range(8)]
    batch = collate_batch(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["decoder_input_ids"].shape == (8, longest)
    assert all(item["input_ids"][:4] == [1212, 2939, 2523, 220] for item in items)  # "This image shows "


def test_sample_k_from_7_draws_other_captions_each_epoch_reproducibly(coco, tiny_smallcap_parts):
    samples = read_training_samples(coco["data"], coco["images"])
    retrieved = json.loads(coco["retrieved"].read_text())
    dataset = CaptionDataset(samples, {}, load_tokenizer(str(tiny_smallcap_parts[1])), retrieved, k=4,
                             sample_k=True, seed=42)
    draws = {}
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        current = [dataset.prompt_captions(i) for i in range(len(dataset))]
        assert draws.setdefault(epoch, current) == current  # the same epoch draws the same captions
    assert draws[0] != draws[1]
    for index, captions in enumerate(draws[0]):
        pool = retrieved[samples[index].image_id][:7]
        assert len(captions) == 4 and captions == [c for c in pool if c in captions]  # retrieval order kept


def _fails_before_training(config, match):
    before = sorted(Path(config.output_dir).glob("*"))
    with pytest.raises(SmallCapError, match=match):
        train(config)
    assert sorted(Path(config.output_dir).glob("*")) == before  # nothing written


@pytest.mark.slow
def test_bad_inputs_stop_before_the_first_step(coco, tiny_smallcap_parts, tmp_path, run):
    data = json.loads(coco["data"].read_text())

    def make(name, content):
        (tmp_path / name).write_text(json.dumps(content))
        return tmp_path / name

    missing_files = make("missing.json", {**data, "images": [{**image, "file_name": "nope-" + image["file_name"]}
                                                             for image in data["images"]]})
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "a", data=str(missing_files),
                                   features=str(tmp_path / "f")), r"8 of 8 image files do not exist")
    unknown = make("unknown.json", {**data, "annotations": data["annotations"] + [
        {"image_id": 123, "id": 1, "caption": "a cat."}]})
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "b", data=str(unknown)),
                           r"refer to 1 image ids that are not in its 'images' list, e\.g\. 123")
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "c", split="val"),
                           r"no captions in split 'val' \(splits present: train\)")
    retrieved = json.loads(coco["retrieved"].read_text())
    first_id = str(min(image["id"] for image in data["images"]))
    partial = make("retrieved.json", {k: v for k, v in retrieved.items() if k != first_id})
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "d", retrieved=str(partial)),
                           rf"no entry for 1 of 8 training images, e\.g\. {first_id}")
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "e", retrieved=None),
                           r"--retrieved FILE .* or --no-retrieval")

    # A feature cache made with another encoder (the tiny GPT-2's twin CLIP, re-seeded) is refused.
    from transformers import CLIPVisionModel

    other = tmp_path / "other-clip"
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionModel.from_pretrained(tiny_smallcap_parts[0]).config).save_pretrained(other)
    for name in ("preprocessor_config.json",):
        (other / name).write_text((tiny_smallcap_parts[0] / name).read_text())
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "g", encoder=str(other)),
                           r"was made with another encoder")

    output_dir, _ = run
    _fails_before_training(_config(coco, tiny_smallcap_parts, output_dir), r"already holds checkpoints .* --resume")
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "h", lr=2e-3,
                                   resume=str(output_dir / "step-3")), r"options differ .* lr \(0\.001 -> 0\.002\)")

    result = run_cli("train", coco["data"], "--retrieved", coco["retrieved"], "--output-dir", tmp_path / "i",
                     "--batch-size", "10", "--gradient-accumulation-steps", "4", check=False)
    assert result.returncode == 2 and "not divisible by --gradient-accumulation-steps 4" in result.stderr


def test_a_few_undecodable_images_are_skipped_and_counted_many_are_an_error(tiny_smallcap_parts, tmp_path, capsys):
    from transformers import AutoImageProcessor, CLIPVisionModel

    from smallcap.training import prepare_features

    encoder = CLIPVisionModel.from_pretrained(tiny_smallcap_parts[0])
    processor = AutoImageProcessor.from_pretrained(tiny_smallcap_parts[0])
    good = [TrainingSample(p.stem, "a photo.", p) for p in sorted((COCO_MINI / "train2017").glob("*.jpg"))[:2]]
    broken = []
    for number in range(11):
        (tmp_path / f"broken{number}.jpg").write_bytes(b"not a jpeg")
        broken.append(TrainingSample(f"b{number}", "a photo.", tmp_path / f"broken{number}.jpg"))

    cache, kept = prepare_features(good + broken[:1], encoder, processor, tmp_path / "a", "tiny", progress=False)
    assert kept == good and sorted(cache) == sorted(s.image_id for s in good)
    assert "skipping 1 undecodable image(s) and their captions: b0" in capsys.readouterr().err
    with pytest.raises(SmallCapError, match="11 of 13 images could not be decoded"):
        prepare_features(good + broken, encoder, processor, tmp_path / "b", "tiny", progress=False)


def test_fp16_on_cpu_is_refused_before_anything_runs(coco, tiny_smallcap_parts, tmp_path):
    _fails_before_training(_config(coco, tiny_smallcap_parts, tmp_path / "fp16", mixed_precision="fp16"),
                           "fp16 mixed precision needs a GPU")
