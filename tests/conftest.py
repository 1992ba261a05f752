"""Shared test fixtures: where the real data lives, and tiny models built from configs in-test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared"))
COCO_MINI = SHARED / "data" / "coco-mini"
COCO_VAL_CAPTIONS = SHARED / "data" / "coco" / "captions_val2017.json"
GPT2_TOKENIZER_DIR = SHARED / "data" / "tokenizers" / "gpt2"
CLIP_TOKENIZER_DIR = SHARED / "data" / "tokenizers" / "clip"
GOLDEN = SHARED / "golden" / "ref-r4"

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One compute thread, here and in every subprocess a test starts (they inherit the environment): float sums,
# hence trained weights and captions, depend on the thread count, so results must not depend on the CPU.
# Set before torch is imported anywhere. Idle OpenMP threads spin by default: on a shared machine, wait passively.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    """Longest file first: with `--dist loadfile` a worker takes whole files in this order, and the small world's
    build, pretraining and pipeline (test_small_world.py, ~15 min on one thread) would otherwise start last."""
    items.sort(key=lambda item: item.path.name != "test_small_world.py")


def pytest_configure(config):
    if not SHARED.is_dir():
        raise pytest.UsageError(f"shared data not found at {SHARED}; set SMALLCAP_SHARED")
    import torch

    torch.set_num_threads(1)


def coco_training_files(out: Path, n_images: int) -> dict:
    """A COCO-format caption file for the first `n_images` real train images of coco-mini in `out`, and the
    retrieved-captions file (for each image, the first caption of each of the next 7 images: never its own)."""
    full = json.loads((COCO_MINI / "annotations" / "captions_train2017.json").read_text())
    images = sorted(full["images"], key=lambda image: image["id"])
    first = {}
    for annotation in sorted(full["annotations"], key=lambda a: a["id"]):
        first.setdefault(annotation["image_id"], annotation["caption"].strip())
    chosen = {image["id"] for image in images[:n_images]}
    data = out / "captions_train2017.json"
    data.write_text(json.dumps({"images": images[:n_images],
                                "annotations": [a for a in full["annotations"] if a["image_id"] in chosen]}))
    ids = [image["id"] for image in images]
    retrieved = {str(q): [first[ids[(i + j) % len(ids)]] for j in range(1, 8)] for i, q in enumerate(ids)}
    (out / "retrieved.json").write_text(json.dumps(retrieved))
    return {"data": data, "retrieved": out / "retrieved.json", "images": COCO_MINI / "train2017", "dir": out,
            "files": [COCO_MINI / "train2017" / image["file_name"] for image in images[:n_images]]}


def run_cli(*args: str, check: bool = True, cwd: Path | None = None, env: dict | None = None):
    """Run `python -m smallcap ARGS` the way a user runs the command; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "smallcap", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"smallcap {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random HF CLIPModel (vision 64-d, text 32-d, 32-d projection) saved with the real CLIP
    tokenizer and CLIP's image-processor settings, loadable with `from_pretrained` like a real checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=32,
    )
    out = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).eval().save_pretrained(out)
    CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR).save_pretrained(out)
    CLIPImageProcessor.from_pretrained(GOLDEN).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_smallcap_parts(tmp_path_factory, tiny_clip_dir) -> tuple[Path, Path]:
    """(CLIP dir, GPT-2 dir) for a tiny SmallCap: the `tiny_clip_dir` CLIP and a tiny random GPT-2
    (64-d, 2 layers, 4 heads, GPT-2's real 50,257-token vocabulary) saved with the real GPT-2 tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4)).eval().save_pretrained(out)
    GPT2Tokenizer.from_pretrained(GPT2_TOKENIZER_DIR).save_pretrained(out)
    return tiny_clip_dir, out


@pytest.fixture(scope="session")
def tiny_smallcap(tiny_smallcap_parts, tmp_path_factory) -> Path:
    """A tiny SmallCap checkpoint directory: the tiny CLIP's vision tower and the tiny GPT-2 with new
    cross-attention, saved with the GPT-2 tokenizer and the CLIP image processor, loadable by `--model`."""
    import torch
    from transformers import CLIPImageProcessor

    from smallcap.modeling import SmallCap
    from smallcap.prompt import load_tokenizer

    clip, gpt2 = tiny_smallcap_parts
    out = tmp_path_factory.mktemp("tiny-smallcap") / "model"
    torch.manual_seed(0)
    SmallCap.from_encoder_decoder_pretrained(str(clip), str(gpt2)).save_pretrained(out)
    load_tokenizer(str(GPT2_TOKENIZER_DIR)).save_pretrained(out)
    CLIPImageProcessor.from_pretrained(clip).save_pretrained(out)
    return out
