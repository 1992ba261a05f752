"""Crash-safe file output: a file or directory is either complete at its final path or absent."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from smallcap.errors import SmallCapError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same directory and an atomic rename."""
    with atomic_open(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for binary writing; on success it is synced and renamed to
    `path`, on error removed. For writers that stream (e.g. `np.save(handle, array)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the user's usual mode
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """Write `data` as UTF-8 JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path`, on error it is removed.

    With `overwrite=False` an existing `path` is an error, so finished output is never clobbered. With
    `overwrite=True` the old directory stays in place until the new one is complete: it is renamed aside,
    the new one renamed in, and only then the old one deleted (callers decide what may be replaced).
    """
    path = Path(os.path.abspath(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | os.PathLike, option: str = "output") -> Path:
    """Check before any work that `path` can be written as a file: not a directory, its folder exists (or can be
    created under an existing one) and is writable. Raises SmallCapError naming `option` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise SmallCapError(f"{option} {path} is a directory; give a file name (e.g. {path / 'captions.jsonl'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise SmallCapError(f"{option} {path} is not writable")
    _check_writable_parent(path, option)
    return path


def check_output_dir(path: str | os.PathLike, option: str = "output directory") -> Path:
    """Check before any work that `path` can be used as an output directory: not a file, and it or its nearest
    existing parent is a writable directory. Raises SmallCapError naming `option` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SmallCapError(f"{option} {path} is a file, not a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise SmallCapError(f"{option} {path} is not writable")
        return path
    _check_writable_parent(path, option)
    return path


def _check_writable_parent(path: Path, option: str) -> None:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SmallCapError(f"{option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SmallCapError(f"{option} {path}: cannot write in {parent} (permission denied)")
