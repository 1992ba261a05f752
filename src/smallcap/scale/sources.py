"""The inputs of a scale-out job, planned as input shards (one output file each) and read item by item.

An input is one of:

- a WebDataset tar shard (`*.tar`, as img2dataset writes them: `{key}.jpg` next to `{key}.txt`/`.json`); the
  image id is the key; each tar is one input shard;
- a folder of images/videos, a glob (`photos/*.jpg`), or a single image/video file; ids are file stems (an
  int when all digits, as `smallcap predict` does);
- an image list: a Parquet/CSV/TSV table with a path column, optionally an id column, and no caption column
  (`smallcap.data.read_image_list`, local predict's rule); relative paths are under `images_dir`, else the
  table's folder;
- an annotation file `smallcap predict` reads (Karpathy, COCO, JSONL, CSV/TSV/Parquet with a caption column,
  MSR-VTT), with `split` and `images_dir`.

Every input may use the brace notation of WebDataset and img2dataset: `shards/{00000..00099}.tar`,
`{train,val}/*.jpg`. Items that are not in tar files are grouped in order into shards of `shard_size`.
"""

from __future__ import annotations

import glob
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from smallcap import video
from smallcap.data import dataset_images, parse_image_id, read_image_list
from smallcap.errors import SmallCapError
from smallcap.images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, expand_inputs

ImageId = int | str
DEFAULT_SHARD_SIZE = 1000
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class InputShard:
    """A unit of work with its own output file: a WebDataset tar (`tar`), or a list of (id, file) `items`."""

    name: str
    tar: str | None = None
    items: tuple[tuple[ImageId, str], ...] = ()


@dataclass
class Item:
    """One input image: its id, its position in its shard, and either a file path or the bytes of a tar member."""

    image_id: ImageId
    position: int
    path: str | None = None
    data: bytes | None = None
    name: str = ""


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a,b}` alternatives and `{000..099}` ranges (zero-padded as written), left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:
        return [pattern]  # a literal brace in a file name
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _is_tar(path: str) -> bool:
    return path.endswith(".tar")


def _resolve(pattern: str) -> list[str]:
    """Brace-expand, then glob what does not exist as written; a pattern matching nothing is an error."""
    paths = []
    for candidate in expand_braces(pattern):
        if Path(candidate).exists():
            paths.append(candidate)
        elif glob.has_magic(candidate):
            matches = sorted(glob.glob(candidate))
            if not matches:
                raise SmallCapError(f"{candidate}: no files match this pattern")
            paths.extend(matches)
        else:
            raise SmallCapError(f"{candidate}: no such file or directory")
    return paths


def _loose_items(path: str, split: str | None, images_dir: str | None,
                 format: str | None) -> list[tuple[ImageId, str]]:
    """The (id, file) items of an input that is not a tar: a folder, an image/video file, an image list (the rule
    local predict uses, `read_image_list`; files are checked when read) or an annotation file."""
    suffix = Path(path).suffix.lower()
    if Path(path).is_dir():
        return [(image_id, str(file)) for image_id, file in dataset_images(path)]
    if suffix in IMAGE_EXTENSIONS or suffix in video.VIDEO_EXTENSIONS:
        return [(parse_image_id(Path(file).stem), str(file)) for file in expand_inputs([path])]
    image_list = read_image_list(path, images_dir, format)
    if image_list is not None:
        return image_list
    return [(image_id, str(file)) for image_id, file in dataset_images(path, split, images_dir, format)]


def plan_shards(inputs: Sequence[str], *, split: str | None = None, images_dir: str | None = None,
                format: str | None = None, shard_size: int = DEFAULT_SHARD_SIZE) -> list[InputShard]:
    """The input shards of a job, in input order: one per tar, the other items grouped `shard_size` at a time.

    Raises SmallCapError for a missing input, a pattern that matches nothing, or an id given twice.
    """
    if shard_size < 1:
        raise SmallCapError(f"shard size must be at least 1 (got {shard_size})")
    shards: list[InputShard] = []
    loose: list[tuple[ImageId, str]] = []
    seen: dict[str, str] = {}
    tar_names: set[str] = set()

    def flush() -> None:
        for start in range(0, len(loose), shard_size):
            shards.append(InputShard(f"part-{len(shards):05d}", items=tuple(loose[start:start + shard_size])))
        loose.clear()

    for pattern in inputs:
        for path in _resolve(str(pattern)):
            if _is_tar(path):
                flush()
                name = base = f"tar-{Path(path).stem}"
                while name in tar_names:  # the same stem in two folders
                    name = f"{base}-{len(tar_names)}"
                tar_names.add(name)
                shards.append(InputShard(name, tar=path))
                continue
            for image_id, file in _loose_items(path, split, images_dir, format):
                if str(image_id) in seen:
                    raise SmallCapError(f"image id {image_id!r} is given twice: {seen[str(image_id)]} and {file}")
                seen[str(image_id)] = file
                loose.append((image_id, file))
    flush()
    if not shards:
        raise SmallCapError(f"no images in {', '.join(map(str, inputs))}")
    return shards


def read_shard(shard: InputShard) -> Iterator[Item]:
    """The items of a shard in order. A tar yields its image members (grouped by key, the part of the member
    name before the first dot of its base name); a key with no image is skipped, a key with two images is an
    error."""
    if shard.tar is None:
        for position, (image_id, path) in enumerate(shard.items):
            yield Item(image_id, position, path=path, name=path)
        return
    try:
        archive = tarfile.open(shard.tar, mode="r:*")
    except (OSError, tarfile.TarError) as error:
        raise SmallCapError(f"{shard.tar}: not a readable tar file ({error})") from None
    position, seen = 0, set()
    with archive:
        for member in archive:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            key, _, extension = base.partition(".")
            if "." + extension.lower().rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS:
                continue  # captions, metadata and other files of the sample
            key = f"{directory}/{key}" if directory else key
            if key in seen:
                raise SmallCapError(f"{shard.tar}: sample {key!r} has more than one image ({member.name})")
            seen.add(key)
            data = archive.extractfile(member).read()
            yield Item(key, position, data=data, name=f"{shard.tar}:{member.name}")
            position += 1


def open_item(item: Item, options=None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """The item as an RGB PIL image (a video file becomes its tiled frames); SmallCapError if unreadable or
    larger than `max_pixels` (None: no limit), checked from the header as `load_image` does."""
    from smallcap.images import decode_image, load_image

    if item.path is not None:
        return load_image(item.path, options, max_pixels=max_pixels)
    return decode_image(io.BytesIO(item.data), item.name, max_pixels=max_pixels)
