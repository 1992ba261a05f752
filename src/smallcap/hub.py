"""Resolving what the user named (local path or Hugging Face Hub id) with clear errors when offline."""

from __future__ import annotations

import os
from pathlib import Path

from smallcap.errors import SmallCapError

DEFAULT_MODEL = "Yova/SmallCap7M"  # the published SmallCap (r=4, GPT-2 small); needs the Hub once


def is_offline() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(var, "").lower() in {"1", "true", "yes", "on"}
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(name: str) -> bool:
    """A name is meant as a local path when it exists, is absolute or relative, or has more than one '/'."""
    return (Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
            or os.sep in name and not name.count("/") == 1)


def resolve_pretrained(name: str, what: str = "model") -> str:
    """Check that `name` is an existing local directory or a Hub id that can be fetched (or is cached).

    Returns `name` unchanged; raises SmallCapError with the reason and the fix otherwise.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise SmallCapError(f"{what} {name!r} is a file; expected a checkpoint directory or a Hub id")
    if looks_like_path(name):
        raise SmallCapError(f"{what} directory {name!r} does not exist")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return name
    if is_offline():
        raise SmallCapError(
            f"{what} {name!r} is a Hugging Face Hub id, it is not in the local cache, and the Hub is offline "
            "(HF_HUB_OFFLINE is set). Download it once with network access, or pass a local checkpoint "
            "directory instead.")
    return name


class explain_load_errors:
    """Context manager turning the OSError/ValueError of a failed `from_pretrained` into one clear SmallCapError."""

    def __init__(self, name: str, what: str = "model"):
        self.name, self.what = name, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, SmallCapError) or not isinstance(exc, (OSError, ValueError, KeyError)):
            return False
        hint = ("" if Path(self.name).exists() else
                " If there is no network here, pass a local checkpoint directory (or set HF_HUB_OFFLINE=1 "
                "to fail fast).")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SmallCapError(f"could not load {self.what} {self.name!r}: {first_line}.{hint}") from exc


CHECKPOINT_FILES = ["*.json", "*.safetensors", "pytorch_model.bin", "*.txt", "*.model"]


def local_snapshot(name: str, what: str = "SmallCap model") -> str:
    """A local directory holding checkpoint `name`: the directory itself, or the Hub snapshot (downloaded once).

    Only config, weight and tokenizer files are fetched, so one loading path serves both cases.
    """
    resolve_pretrained(name, what)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download

    with explain_load_errors(name, what):
        return snapshot_download(name, allow_patterns=CHECKPOINT_FILES)
