"""Resolving what the user named (local path, bundled short name, or Hugging Face Hub id) with clear errors.

The one place that knows the short names of what ships inside the package (`src/smallcap/assets/miniworld/`,
built by `scripts/build_bundle.py`): a miniature SmallCap, its CLIP retrieval encoder and two caption
datastores of the synthetic "miniworld", so everything runs offline out of the box:

    mini          the bundled SmallCap model (trained with retrieval on the source domain)
    mini-clip     the bundled CLIP (retrieval encoder of the bundled datastores)
    mini-source   datastore of the source domain's training captions
    mini-target   datastore of the target domain's training captions (never seen in training)

An existing local path of the same name takes precedence over a short name.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
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


BUNDLE_DIR = Path(__file__).resolve().parent / "assets" / "miniworld"
BUNDLED_MODELS = {"mini": "smallcap", "mini-clip": "clip"}  # short name -> directory in BUNDLE_DIR
BUNDLED_DATASTORES = {"mini-source": "datastores/source", "mini-target": "datastores/target"}
BUNDLED_SAMPLES = BUNDLE_DIR / "samples"


def bundled_path(name: str | os.PathLike) -> Path | None:
    """The bundled directory a short name stands for (None for other names and for existing local paths)."""
    name = str(name)
    relative = BUNDLED_MODELS.get(name) or BUNDLED_DATASTORES.get(name)
    if relative is None or Path(name).expanduser().exists():
        return None
    path = BUNDLE_DIR / relative
    if not path.is_dir():
        raise SmallCapError(f"the bundled {name!r} is missing from this installation ({path}); rebuild it with "
                            "`python scripts/build_bundle.py` or reinstall smallcap")
    return path


def bundled_name(path: str | os.PathLike) -> str | None:
    """The short name of a bundled directory (so records of it work from any install path), else None."""
    try:
        resolved = Path(path).expanduser().resolve()
    except OSError:
        return None
    for name, relative in {**BUNDLED_MODELS, **BUNDLED_DATASTORES}.items():
        if resolved == (BUNDLE_DIR / relative).resolve():
            return name
    return None


def resolve_datastore(name: str | os.PathLike) -> Path:
    """A datastore directory: a bundled short name (`mini-source`, `mini-target`) or a path."""
    return bundled_path(name) or Path(name)


def resolve_pretrained(name: str, what: str = "model") -> str:
    """Check that `name` is an existing local directory, a bundled short name (`mini`, `mini-clip`) or a Hub
    id that can be fetched (or is cached).

    Returns the local directory of a short name, else `name` unchanged; raises SmallCapError with the reason
    and the fix otherwise.
    """
    name = str(name)
    bundled = bundled_path(name) if name in BUNDLED_MODELS else None
    if bundled is not None:
        return str(bundled)
    if name in BUNDLED_DATASTORES and not Path(name).exists():
        raise SmallCapError(f"{name!r} is a bundled datastore, not a {what}; pass it as --datastore {name}")
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
            f"(HF_HUB_OFFLINE is set). Download it once with network access, or {way_out(what)}.")
    unreachable = hub_unreachable()
    if unreachable:
        raise SmallCapError(
            f"{what} {name!r} is a Hugging Face Hub id, it is not in the local cache, and the Hub cannot be reached "
            f"({unreachable}). Download it once with network access, or {way_out(what)}. "
            "(Set HF_HUB_OFFLINE=1 to skip this check.)")
    return name


def way_out(what: str) -> str:
    """What the user can pass instead of a Hub download of `what`, for error messages."""
    if "tokenizer" in what:
        return ("pass a local tokenizer directory (--tokenizer DIR), the model whose tokenizer to use (--model mini "
                "for the bundled one), or --max-tokens 0 to build a datastore without the length filter")
    if "SmallCap" in what:
        return "pass a local checkpoint directory, or --model mini for the bundled model"
    if "encoder" in what:
        return "pass a local CLIP directory, or mini-clip for the bundled one"
    return "pass a local directory instead"


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (one TCP connection attempt to HF_ENDPOINT), or None when it can.

    Lets a machine without network fail in seconds instead of after the Hub client's retries. Behind a
    proxy (HTTPS_PROXY/ALL_PROXY set) the check is skipped and the Hub client decides.
    """
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host}:{port}: {error.strerror or error}"
    return None


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
                f" If there is no network here, {way_out(self.what)} (and set HF_HUB_OFFLINE=1 to fail fast).")
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SmallCapError(f"could not load {self.what} {self.name!r}: {first_line}.{hint}") from exc


CHECKPOINT_FILES = ["*.json", "*.safetensors", "pytorch_model.bin", "*.txt", "*.model"]


def local_snapshot(name: str, what: str = "SmallCap model") -> str:
    """A local directory holding checkpoint `name`: the directory itself, or the Hub snapshot (downloaded once).

    Only config, weight and tokenizer files are fetched, so one loading path serves both cases.
    """
    name = resolve_pretrained(name, what)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download

    with explain_load_errors(name, what):
        return snapshot_download(name, allow_patterns=CHECKPOINT_FILES)
