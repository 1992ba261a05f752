"""Crash-safe file output (a file or directory is either complete at its final path or absent), and the
one Parquet writer and reader of smallcap's row files (predictions, per-shard outputs)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from smallcap.errors import SmallCapError, require_extra


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


PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether `path` names a Parquet file (`.parquet` or `.pq`): the one rule for choosing Parquet output."""
    return Path(path).suffix.lower() in PARQUET_SUFFIXES


def require_parquet(purpose: str):
    """The `pyarrow` module with Parquet support, or MissingExtraError naming `pip install 'smallcap[parquet]'`;
    call it before any work whose output is Parquet (`purpose`: "Writing preds.parquet")."""
    require_extra("pyarrow.parquet", "parquet", purpose)
    import pyarrow

    return pyarrow


def _column_type(pa, values: list):
    """An Arrow type for a column of JSON-like values: image ids that are all ints stay int64, a mix of ints and
    strings becomes strings (as `str(image_id)`, the key every smallcap file is matched by)."""
    present = [value for value in values if value is not None]
    if present and all(isinstance(value, int) and not isinstance(value, bool) for value in present):
        return pa.int64(), values
    if present and all(isinstance(value, list) for value in present):
        return pa.list_(pa.string()), values
    return pa.string(), [None if value is None else str(value) for value in values]


def atomic_write_parquet(path: str | os.PathLike, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write `rows` (dicts of ints, strings or lists of strings; a key a row lacks is null) as a Parquet table
    with `columns`, atomically. Needs the optional extra `smallcap[parquet]`."""
    pa = require_parquet(f"Writing {Path(path).name} as Parquet")
    import pyarrow.parquet as pq

    arrays, fields = [], []
    for name in columns:
        kind, values = _column_type(pa, [row.get(name) for row in rows])
        arrays.append(pa.array(values, type=kind))
        fields.append(pa.field(name, kind))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    with atomic_open(path) as handle:
        pq.write_table(table, handle)


def read_parquet_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a Parquet table as dicts, null cells left out (the inverse of `atomic_write_parquet`).
    Raises SmallCapError for a file that is missing or not Parquet."""
    require_parquet(f"Reading {Path(path).name}")
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except FileNotFoundError:
        raise SmallCapError(f"{path} does not exist") from None
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise SmallCapError(f"{path}: not readable as Parquet ({error})") from None
    return [{key: value for key, value in row.items() if value is not None} for row in rows]


def atomic_write_predictions(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write a predictions file `[{"image_id", "caption"}]` atomically: a Parquet table with those two columns
    when `path` ends in .parquet/.pq, else the JSON list `smallcap evaluate` reads."""
    if is_parquet(path):
        atomic_write_parquet(path, rows, ("image_id", "caption"))
    else:
        atomic_write_json(path, rows)
