"""Caption-file readers: every supported format becomes a stream of `CaptionRecord`s. The one reader of
annotation files: training, the datastore build, predict and evaluation all read through this module.

Formats (auto-detected from the extension, and for `.json` from the content; `format=` overrides):

- `text`: UTF-8 text, one caption per line (blank lines skipped); image id = line number.
- `json`: a JSON list of caption strings (id = position), or of objects with a caption field (`column`).
- `coco`: COCO caption annotations `{"images": [...], "annotations": [{"image_id", "caption"}]}`.
- `karpathy`: a Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`); id = `cocoid`, else
  `imgid`; the split of each image is kept (datastores use train + restval).
- `msrvtt`: MSR-VTT `{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}`.
- `jsonl`: one JSON object per line with a caption field (`column`); id = `id_column`, else an `image_id`
  field, else the stem of the row's image file, else the line number.
- `csv`: a header row, then one caption per row (`.tsv`: tab-separated); ids as for jsonl (row position).
- `parquet`: a table with a caption column (needs pyarrow: `pip install smallcap[parquet]`); ids as jsonl.

Table-like formats (json objects, jsonl, csv, parquet) also pick up an image file from the first of
`IMAGE_COLUMNS` present (or `image_column`) and a split from a `split` column, so training code can read
(image, caption, split) triples from them.

Text rules (`TEXT_RULES`, the `text=` option), one per use:

- "raw" (the reader's default): the caption as written with its whitespace collapsed to single spaces (COCO has
  captions ending in newlines, which would break the prompt's "\\n\\n"-separated layout). Evaluation references
  are always raw (`smallcap.evaluation.load_references`), as pycocoevalcap scores them.
- "tokens": for Karpathy files, each sentence's `tokens` joined by one space (lower case, no punctuation), as
  the reference builds its training targets and its datastore. Training (`smallcap.training_data`) always reads
  Karpathy files this way, and the datastore build does by default (`DATASTORE_TEXT`; `smallcap datastore build
  --text raw` indexes the raw sentences instead). Other formats have no tokens and read as raw.

An image list (no captions: what to caption) is a Parquet/CSV/TSV table with a path column (`PATH_COLUMNS`) and
optionally an id column (`ID_COLUMNS`; default: the file stem) and no caption column, read by `read_image_list`,
the one rule local predict and the Ray planner share (a table with a caption column is an annotation file).

Image ids follow one rule everywhere (`parse_image_id`, `image_id_key`: ids compare as strings, a digit string
is the int it spells), and `dataset_images` finds the image or video file of each id, for predict, training
retrieval and the Ray jobs.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from smallcap.errors import SmallCapError
from smallcap.images import expand_inputs, find_media
from smallcap.io import require_parquet

FORMATS = ("text", "json", "coco", "karpathy", "msrvtt", "jsonl", "csv", "parquet")
EXTENSIONS = {".txt": "text", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
              ".parquet": "parquet", ".pq": "parquet"}
IMAGE_COLUMNS = ("image", "image_file", "file_name", "filename", "image_path")
# An image list (`read_image_list`): a table with a path column and optionally an id column, no caption column.
PATH_COLUMNS = ("path", *IMAGE_COLUMNS)
ID_COLUMNS = ("image_id", "id", "key")
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
# Which text of a caption a use reads. The reference builds both its training targets and its datastore from
# Karpathy's tokens; evaluation always scores against the raw references.
TEXT_RULES = {"raw": "the caption as written, whitespace collapsed (evaluation references, other formats)",
              "tokens": "Karpathy files: the sentence's tokens joined by spaces (training targets, the reference's "
                        "datastore)"}
# What a datastore build indexes by default: the reference's datastore text, so a model trained as the reference
# trains (on token-joined retrieved captions) is prompted with the same kind of text it was trained with.
DATASTORE_TEXT = "tokens"
# Karpathy's "restval" images are COCO val2014 images that the split moves into training.
DATASTORE_SPLITS = ("train", "restval")

EXPECTED = {
    "text": "UTF-8 text with one caption per line",
    "json": "a JSON list of caption strings (or of objects with a {column!r} field)",
    "coco": 'COCO caption annotations {{"images": [{{"id": ...}}], '
            '"annotations": [{{"image_id": ..., "caption": "..."}}]}}',
    "karpathy": 'a Karpathy split file {{"images": [{{"cocoid" or "imgid": ..., "split": "test", '
                '"sentences": [{{"raw": "..."}}]}}]}}',
    "msrvtt": 'MSR-VTT annotations {{"videos": [{{"video_id": ..., "split": "test"}}], '
              '"sentences": [{{"video_id": ..., "caption": "..."}}]}}',
    "jsonl": "one JSON object per line with a {column!r} field",
    "csv": "a CSV file whose header has a {column!r} column",
    "parquet": "a Parquet table with a {column!r} column",
}


ImageId = int | str


@dataclass(frozen=True)
class CaptionRecord:
    """One caption with where it came from: the image (or video) it describes and the file it was read from.

    `image_id` keeps the file's type (int for COCO/Karpathy, str for MSR-VTT and most tables); datastores
    compare ids as strings. `image_file` (relative, as written in the file) and `split` are set where the
    format has them.
    """

    caption: str
    image_id: int | str
    source: str
    image_file: str | None = None
    split: str | None = None


def parse_image_id(value: Any, where: str = "image id") -> int | str:
    """The one image-id rule: ints stay ints, a string of digits is the int it spells ("000000000139" -> 139,
    so file stems match COCO ids), any other non-empty string is kept. `where` names the place in errors."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if value.strip().isdigit() else value
    raise SmallCapError(f"{where}: image id {value!r} is not an int or a string")


def image_id_key(value: Any) -> str:
    """An image id as the string key of JSON tables ({image_id: [captions]}): `str(parse_image_id(value))`."""
    return str(parse_image_id(value))


def clean_caption(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space and strip the ends."""
    return " ".join(text.split())


def detect_format(path: str | Path) -> str:
    """Guess a file's format from its extension; `.json` files are refined by `read_captions` from content."""
    return EXTENSIONS.get(Path(path).suffix.lower(), "text")


def read_captions(path: str | Path, format: str | None = None, column: str = "caption", id_column: str | None = None,
                  image_column: str | None = None, splits: Sequence[str] | None = None,
                  text: str = "raw", strict: bool = False) -> Iterator[CaptionRecord]:
    """Yield the caption records of one file.

    `text` (see TEXT_RULES): "raw", the caption as written, whitespace-cleaned; "tokens", for Karpathy files
    Karpathy's tokens joined by spaces (lower case, no punctuation), what the reference trains on.

    `format`: one of FORMATS, or None to detect it. `column`/`id_column`/`image_column`: field names for
    table-like formats. `splits`: keep only records whose split is one of these (records without a split
    are always kept); None keeps everything. `strict`: every table row must name its image (an id field or an
    image file) and have caption text, as training needs; otherwise the row position stands in for a missing
    id. Raises SmallCapError naming the file (and line) on bad input.
    """
    path = Path(path)
    if not path.is_file():
        raise SmallCapError(f"caption file {path} does not exist" if not path.exists() else f"{path} is not a file")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise SmallCapError(f"unknown caption format {fmt!r}; expected one of {', '.join(FORMATS)}")
    table = _TableOptions(column, id_column, image_column, strict)
    if fmt == "text":
        records = _read_text(path)
    elif fmt == "jsonl":
        records = _read_jsonl(path, table)
    elif fmt == "csv":
        records = _read_csv(path, table)
    elif fmt == "parquet":
        records = _read_parquet(path, table)
    else:
        content = load_json(path, "caption", expected_form(format, column) if format else None)
        records = read_caption_data(content, path, format, column,
                                    id_column, image_column, text, strict)
    allowed = None if splits is None else set(splits)
    for record in records:
        if allowed is None or record.split is None or record.split in allowed:
            yield record


def read_caption_files(paths: Iterable[str | Path], **options: Any) -> list[CaptionRecord]:
    """Read several caption files (same options for each) into one list, in order."""
    return [record for path in paths for record in read_captions(path, **options)]


def load_json(path: str | os.PathLike, what: str = "caption", expected: str | None = None) -> Any:
    """A JSON file's content (UTF-8, a BOM allowed), or a SmallCapError naming the `what` file and the problem:
    missing, unreadable, not UTF-8 (byte and offset), not JSON (line and column), and `expected` (what the file
    should hold, e.g. `expected_form("coco")`) if given."""
    path = Path(path)
    expected = f"; expected {expected}" if expected else ""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SmallCapError(f"{what} file {path} does not exist") from None
    except OSError as error:
        raise SmallCapError(f"cannot read {what} file {path}: {error.strerror}") from None
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SmallCapError(f"{what} file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset "
                            f"{error.start}); re-save it as UTF-8 JSON{expected}") from None
    try:
        return json.loads(content)
    except json.JSONDecodeError as error:
        raise SmallCapError(f"{what} file {path} is not valid JSON: {error.msg} at line {error.lineno} "
                            f"column {error.colno}{expected}") from None


def expected_form(fmt: str, column: str = "caption") -> str:
    """What a file of format `fmt` should look like, for error messages."""
    return EXPECTED[fmt].format(column=column)


def _error(path: Path, fmt: str, problem: str, line: int | None = None, column: str = "caption") -> SmallCapError:
    where = f"{path}:{line}" if line is not None else str(path)
    return SmallCapError(f"{where}: {problem}; expected {expected_form(fmt, column)}")


def _read_text(path: Path) -> Iterator[CaptionRecord]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _error(path, "text", "not valid UTF-8 (is this a binary file?)", number) from None
            if "\x00" in line:
                raise _error(path, "text", "contains NUL bytes (is this a binary file?)", number)
            if line.strip():
                yield CaptionRecord(clean_caption(line), number, str(path))


@dataclass(frozen=True)
class _TableOptions:
    """How to read the rows of a table-like format: the caption, id and image fields, and `strict` (see
    `read_captions`)."""

    column: str = "caption"
    id_column: str | None = None
    image_column: str | None = None
    strict: bool = False


def _table_record(path: Path, fmt: str, row: dict, position: int, line: int | None,
                  table: _TableOptions) -> CaptionRecord:
    """Turn one row of a table-like format into a record, checking the named fields."""
    column, id_column, image_column = table.column, table.id_column, table.image_column
    caption = row.get(column)
    if not isinstance(caption, str):
        problem = f"no {column!r} field" if caption is None else f"{column!r} is {type(caption).__name__}, not text"
        raise _error(path, fmt, problem + (f" (fields: {', '.join(map(str, row))})" if caption is None else ""),
                     line, column)
    if table.strict and not caption.strip():
        raise _error(path, fmt, f"empty {column!r}", line, column)
    image_key = image_column or next((name for name in IMAGE_COLUMNS if row.get(name)), None)
    if image_column is not None and not row.get(image_column):
        raise _error(path, fmt, f"no {image_column!r} image field", line, column)
    image_file = str(row[image_key]) if image_key else None
    if id_column is not None:
        if row.get(id_column) in (None, ""):
            raise _error(path, fmt, f"no {id_column!r} id field", line, column)
        image_id = row[id_column]
    elif row.get("image_id") not in (None, ""):
        image_id = row["image_id"]
    elif image_file:
        image_id = Path(image_file).stem
    elif table.strict:
        raise _error(path, fmt, f"no 'image_id' field and no image file ({', '.join(IMAGE_COLUMNS)}); each row "
                     f"must name its image (fields: {', '.join(map(str, row))})", line, column)
    else:
        image_id = position
    split = row.get("split") or None
    return CaptionRecord(clean_caption(caption), image_id, str(path), image_file, None if split is None else str(split))


def _read_jsonl(path: Path, table: _TableOptions) -> Iterator[CaptionRecord]:
    column = table.column
    with open(path, encoding="utf-8", errors="strict") as handle:
        number = 0
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise _error(path, "jsonl", f"not JSON ({error.msg})", number, column) from None
                if not isinstance(row, dict):
                    raise _error(path, "jsonl", f"a JSON {type(row).__name__}, not an object", number, column)
                yield _table_record(path, "jsonl", row, number, number, table)
        except UnicodeDecodeError:
            raise _error(path, "jsonl", "not valid UTF-8", number + 1, column) from None


def _read_csv(path: Path, table: _TableOptions) -> Iterator[CaptionRecord]:
    column = table.column
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            header = reader.fieldnames or []
            if column not in header:
                raise _error(path, "csv", f"no {column!r} column in the header (columns: {', '.join(header)})", 1,
                             column)
            for position, row in enumerate(reader):
                if None in row:  # more cells than header columns
                    raise _error(path, "csv", f"{len(header) + len(row[None])} cells for {len(header)} columns",
                                 reader.line_num, column)
                yield _table_record(path, "csv", row, position, reader.line_num, table)
        except UnicodeDecodeError:
            raise _error(path, "csv", "not valid UTF-8", reader.line_num + 1, column) from None
        except csv.Error as error:
            raise _error(path, "csv", f"malformed CSV ({error})", reader.line_num, column) from None


def _read_parquet(path: Path, table: _TableOptions) -> Iterator[CaptionRecord]:
    column, id_column, image_column = table.column, table.id_column, table.image_column
    require_parquet(f"Reading {path}")
    import pyarrow.parquet as pq

    try:
        content = pq.read_table(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid/OSError family
        raise _error(path, "parquet", f"not readable as Parquet ({error})", column=column) from None
    if column not in content.column_names:
        raise _error(path, "parquet", f"no {column!r} column (columns: {', '.join(content.column_names)})",
                     column=column)
    wanted = [name for name in (column, id_column, image_column, "image_id", "split", *IMAGE_COLUMNS)
              if name and name in content.column_names]
    for position, row in enumerate(content.select(list(dict.fromkeys(wanted))).to_pylist()):
        try:
            yield _table_record(path, "parquet", row, position, None, table)
        except SmallCapError as error:
            raise SmallCapError(f"{error} (row {position})") from None


def read_caption_data(data: Any, source: str | Path, format: str | None = None, column: str = "caption",
                      id_column: str | None = None, image_column: str | None = None,
                      text: str = "raw", strict: bool = False) -> Iterator[CaptionRecord]:
    """The caption records of an already-loaded JSON document (`source` names it in records and errors).

    `format`: json, coco, karpathy or msrvtt, or None to recognise it from the content (`json_format`);
    `text` and `strict` as for `read_captions`.
    """
    if text not in TEXT_RULES:
        raise ValueError(f"unknown text rule {text!r}; expected one of {', '.join(TEXT_RULES)}")
    path = Path(source)
    fmt = format or json_format(data)
    if fmt == "json":
        return _read_json_list(path, data, _TableOptions(column, id_column, image_column, strict))
    if fmt == "karpathy":
        return _read_karpathy(path, data, text)
    return {"coco": _read_coco, "msrvtt": _read_msrvtt}[fmt](path, data)


def json_format(data: Any) -> str:
    """Which JSON caption format a loaded document is: "msrvtt", "coco", "karpathy", else "json"."""
    if isinstance(data, dict):
        images = data.get("images")
        if "videos" in data and "sentences" in data:
            return "msrvtt"
        if "annotations" in data:
            return "coco"
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            return "karpathy"
    return "json"


def _read_json_list(path: Path, data: Any, table: _TableOptions) -> Iterator[CaptionRecord]:
    column = table.column
    if not isinstance(data, list):
        raise _error(path, "json", f"a JSON {type(data).__name__} of an unknown layout", column=column)
    for position, item in enumerate(data):
        if isinstance(item, str) and not table.strict:
            yield CaptionRecord(clean_caption(item), position, str(path))
        elif isinstance(item, dict):
            try:
                yield _table_record(path, "json", item, position, None, table)
            except SmallCapError as error:
                raise SmallCapError(f"{error} (item {position})") from None
        else:
            raise _error(path, "json", f"item {position} is a {type(item).__name__}", column=column)


def _require(path: Path, fmt: str, item: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(item, dict) or any(key not in item for key in keys):
        missing = keys if not isinstance(item, dict) else [key for key in keys if key not in item]
        raise _error(path, fmt, f"{where} has no {', '.join(map(repr, missing))}")


def _require_lists(path: Path, fmt: str, data: Any, keys: Sequence[str]) -> None:
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise _error(path, fmt, f"no {key!r} list at the top level")


def coco_images(data: dict, source: str | Path) -> dict[ImageId, dict]:
    """The entries of COCO annotations' `images` list by image id (`parse_image_id`), in file order; each needs
    an "id". (Evaluation reads their nocaps-style "domain" and lists images that have no caption.)"""
    images: dict[ImageId, dict] = {}
    for position, image in enumerate(data.get("images") or []):
        if not isinstance(image, dict) or "id" not in image:
            raise _error(Path(source), "coco", f'images[{position}] has no "id"')
        images[parse_image_id(image["id"], f"{source}: images[{position}]")] = image
    return images


def _read_coco(path: Path, data: dict) -> Iterator[CaptionRecord]:
    _require_lists(path, "coco", data, ("annotations",))
    images = coco_images(data, path)
    for position, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation \
                or not isinstance(annotation.get("caption"), str):
            hint = " (object annotations, not captions?)" if isinstance(annotation, dict) and "bbox" in annotation else ""
            raise _error(path, "coco", f'annotations[{position}] is not {{"image_id", "caption": str}}{hint}')
        image_id = annotation["image_id"]
        image = images.get(parse_image_id(image_id, f"{path}: annotations[{position}]"), {})
        yield CaptionRecord(clean_caption(annotation["caption"]), image_id, str(path), image.get("file_name"))


def _read_karpathy(path: Path, data: dict, text: str = "raw") -> Iterator[CaptionRecord]:
    _require_lists(path, "karpathy", data, ("images",))
    for position, image in enumerate(data["images"]):
        _require(path, "karpathy", image, ("sentences",), f"image {position}")
        image_id = image.get("cocoid", image.get("imgid"))
        if image_id is None:
            raise _error(path, "karpathy", f'image {position} has neither "cocoid" nor "imgid"')
        name = image.get("filename")
        image_file = str(Path(image["filepath"]) / name) if name and image.get("filepath") else name
        for sentence in image["sentences"]:
            _require(path, "karpathy", sentence, ("raw",), f"a sentence of image {position}")
            tokens = sentence.get("tokens") if text == "tokens" else None
            caption = " ".join(map(str, tokens)) if tokens else clean_caption(sentence["raw"])
            yield CaptionRecord(caption, image_id, str(path), image_file, image.get("split"))


def _read_msrvtt(path: Path, data: dict) -> Iterator[CaptionRecord]:
    _require_lists(path, "msrvtt", data, ("videos", "sentences"))
    splits = {}
    for position, video in enumerate(data["videos"]):
        _require(path, "msrvtt", video, ("video_id",), f"video {position}")
        splits[video["video_id"]] = video.get("split")
    for position, sentence in enumerate(data["sentences"]):
        _require(path, "msrvtt", sentence, ("video_id", "caption"), f"sentence {position}")
        video_id = sentence["video_id"]
        yield CaptionRecord(clean_caption(sentence["caption"]), video_id, str(path), None, splits.get(video_id))


def read_image_list(path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                    format: str | None = None) -> list[tuple[ImageId, str]] | None:
    """The one rule for which inputs are image lists (what to caption), used by local predict (`dataset_images`)
    and the Ray planner alike: a Parquet/CSV/TSV table (`TABLE_SUFFIXES`, no `format` given) without a "caption"
    column. Its path column (`PATH_COLUMNS`) names each image or video (relative paths are under `images_dir`,
    else the table's folder) and an optional id column (`ID_COLUMNS`) its id (default: the file stem).

    Returns the (id, file) pairs in table order, read in one pass (for Parquet only the path and id columns), or
    None when `path` is not an image list: not a table, a `format` given, or a "caption" column (an annotation
    file, for `read_captions`). Raises SmallCapError naming the file (and row) for a table with no path column,
    an empty path, or an id given twice.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if format is not None or suffix not in TABLE_SUFFIXES:
        return None
    root = Path(images_dir) if images_dir is not None else path.parent
    if suffix in (".parquet", ".pq"):
        return _parquet_image_list(path, root)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")

            def rows(*_: str | None) -> Iterator[tuple[str, dict]]:
                return ((f"{path}:{reader.line_num}", row) for row in reader)

            return _image_list_pairs(path, list(reader.fieldnames or []), rows, root)
    except OSError as error:
        raise SmallCapError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SmallCapError(f"{path}: not valid UTF-8") from None
    except csv.Error as error:
        raise SmallCapError(f"{path}: malformed CSV ({error})") from None


def _parquet_image_list(path: Path, root: Path) -> list[tuple[ImageId, str]] | None:
    require_parquet(f"Reading {path}")
    import pyarrow.parquet as pq

    def rows(*columns: str | None) -> Iterator[tuple[str, dict]]:
        try:
            content = table.read(columns=[name for name in columns if name])
        except Exception as error:  # pyarrow raises its own ArrowInvalid/OSError family
            raise SmallCapError(f"{path}: not readable as Parquet ({error})") from None
        return ((f"{path}, row {number}", row) for number, row in enumerate(content.to_pylist()))

    try:
        table = pq.ParquetFile(path)
    except Exception as error:
        raise SmallCapError(f"{path}: not readable as Parquet ({error})") from None
    with table:
        return _image_list_pairs(path, table.schema_arrow.names, rows, root)


def _image_list_pairs(path: Path, columns: list[str], rows: Callable[..., Iterable[tuple[str, dict]]],
                      root: Path) -> list[tuple[ImageId, str]] | None:
    """`read_image_list` on a table's `columns`; `rows(path_column, id_column)` reads its rows, each with where
    it is (`file:line` or `file, row N`), only once it is an image list."""
    if "caption" in columns:
        return None
    path_column = next((name for name in PATH_COLUMNS if name in columns), None)
    if path_column is None:
        raise SmallCapError(f"{path}: no image path column (expected one of {', '.join(PATH_COLUMNS)}; "
                            f"columns: {', '.join(map(str, columns)) or 'none'}); a table with a 'caption' column "
                            "is read as annotations")
    id_column = next((name for name in ID_COLUMNS if name in columns), None)
    pairs: list[tuple[ImageId, str]] = []
    first_seen: dict[str, str] = {}
    for where, row in rows(path_column, id_column):
        if not row.get(path_column):
            raise SmallCapError(f"{where}: empty {path_column!r}; expected the path of an image or video")
        file = root / str(row[path_column])
        image_id = row.get(id_column) if id_column is not None else None
        if image_id in (None, ""):
            image_id = file.stem
        image_id = parse_image_id(image_id, where) if isinstance(image_id, str) else image_id
        if str(image_id) in first_seen:
            raise SmallCapError(f"{where}: image id {image_id!r} is given twice (first at {first_seen[str(image_id)]})")
        first_seen[str(image_id)] = where
        pairs.append((image_id, str(file)))
    return pairs


def default_image_root(path: str | os.PathLike) -> Path:
    """Where the image files of a caption file are by default: for COCO's `annotations/captions_<name>.json`,
    the sibling folder `<name>/` (e.g. `val2017/`) if it exists, else the caption file's own folder."""
    path = Path(path)
    match = re.match(r"captions_(\w+)\.json$", path.name)
    if match and path.parent.name == "annotations" and (path.parent.parent / match.group(1)).is_dir():
        return path.parent.parent / match.group(1)
    return path.parent


def dataset_images(data: str | os.PathLike, split: str | None = None, images_dir: str | os.PathLike | None = None,
                   format: str | None = None) -> list[tuple[ImageId, Path]]:
    """The (image id, file) pairs to caption: a folder of images/videos (id = file stem, as an int when it is
    digits), an image list (`read_image_list`: a Parquet/CSV/TSV table with a path column and no caption
    column), or the images of `split` in a caption file (Karpathy, COCO, JSONL/CSV with an image column,
    MSR-VTT), found under `images_dir` (default: `default_image_root`)."""
    data = Path(data)
    if data.is_dir():
        return [(parse_image_id(path.stem), path) for path in expand_inputs([data])]
    if not data.exists():
        raise SmallCapError(f"{data}: no such file or directory")
    root = Path(images_dir) if images_dir is not None else default_image_root(data)
    pairs: dict[ImageId, Path] = {}
    image_list = read_image_list(data, images_dir, format)
    if image_list is not None:
        pairs.update((image_id, Path(file)) for image_id, file in image_list)
        records: Iterable[CaptionRecord] = ()
    else:
        records = read_captions(data, format=format, splits=None if split is None else [split])
    for record in records:
        if record.image_id in pairs or (split is not None and record.split not in (None, split)):
            continue
        path = root / record.image_file if record.image_file else find_media(root, record.image_id)
        if path is None:
            raise SmallCapError(f"{data}: no file for image {record.image_id!r} in {root} (tried "
                                f"{record.image_id}.jpg, .png, .mp4, ...); pass --images-dir")
        pairs[record.image_id] = path
    if not pairs:
        raise SmallCapError(f"{data}: no images{'' if split is None else f' in split {split!r}'}")
    missing = [str(path) for path in pairs.values() if not path.is_file()]
    if missing:
        raise SmallCapError(f"{data}: {len(missing)} of {len(pairs)} image files not found, e.g. {missing[0]}; "
                            "pass --images-dir with the folder that holds them")
    return list(pairs.items())
