"""Shared test fixtures: where the real data lives, and tiny models built from configs in-test."""

from __future__ import annotations

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


def pytest_configure(config):
    if not SHARED.is_dir():
        raise pytest.UsageError(f"shared data not found at {SHARED}; set SMALLCAP_SHARED")


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
