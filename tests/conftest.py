"""Shared test fixtures: where the real data lives, and tiny models built from configs in-test."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
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
    """Longest file first: with `--dist loadfile --no-loadscope-reorder` (pyproject.toml) the workers take whole
    files in this order, and the small world's build, pretraining and pipeline (test_small_world.py, 8-12 min on one
    thread), which bounds the suite's wall time, would otherwise start minutes late."""
    items.sort(key=lambda item: item.path.name != "test_small_world.py")


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (captions and scores depend on the thread count), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """Run the `smallcap` command with ARGS as its own process, the way a user runs it; returns the
    CompletedProcess. The process is forked from a warm interpreter (`cli_zygote.py`) unless `env` changes what
    the imports read or SMALLCAP_TEST_FRESH_INTERPRETER=1; then it is a fresh `python -m smallcap`."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    args = [str(arg) for arg in args]
    if os.environ.get("SMALLCAP_TEST_FRESH_INTERPRETER") == "1" or not _WARM_CLI.serves(full_env):
        result = subprocess.run([sys.executable, "-m", "smallcap", *args], capture_output=True, text=True, cwd=cwd,
                                env=full_env, timeout=900)
    else:
        result = _WARM_CLI.run(args, cwd, full_env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"smallcap {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


class _WarmInterpreter:
    """The client side of `cli_zygote.py`: one warm interpreter per test process, started on first use."""

    # Environment variables read when torch, transformers, faiss or Python start: a run that changes one of
    # these needs a fresh interpreter.
    IMPORT_TIME = ("HF_", "HUGGINGFACE", "TRANSFORMERS_", "TORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "PYTHON",
                   "CUDA", "LD_")

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.pending = b""

    def serves(self, env: dict[str, str]) -> bool:
        if self.process is None:
            return True
        keys = {k for k in {*env, *self.env} if k.startswith(self.IMPORT_TIME)}
        return all(env.get(k) == self.env.get(k) for k in keys)

    def _start(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_zygote.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO)

    def _reply(self, deadline: float) -> dict:
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the warm interpreter died (exit status {self.process.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, args: list[str], cwd: Path | None, env: dict[str, str], timeout: float):
        if self.process is None:
            self._start(env)
        with tempfile.TemporaryDirectory(prefix="smallcap-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"args": args, "env": env, "cwd": str(cwd) if cwd else None, "stdout": str(out),
                       "stderr": str(err)}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            deadline = time.monotonic() + timeout
            pid = self._reply(deadline)["pid"]
            try:
                returncode = self._reply(deadline)["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply(time.monotonic() + 60)
                raise subprocess.TimeoutExpired(["smallcap", *args], timeout) from None
            return subprocess.CompletedProcess(["smallcap", *args], returncode,
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
            self.process = None


_WARM_CLI = _WarmInterpreter()


def pytest_unconfigure(config):
    _WARM_CLI.close()


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
