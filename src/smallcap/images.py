"""Turning what the user passes (paths, directories, PIL images, arrays) into RGB PIL images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from smallcap import video
from smallcap.errors import SmallCapError

# Pillow's own decompression-bomb threshold (about 89.5 million pixels, a 9459x9459 image); larger images are
# refused from their header alone, before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass
class VideoOptions:
    """How a video input becomes one image: `frames` sampled frames in a rows x cols grid (default 2x2),
    optionally saved as PNG under `save_tiles` so the user can see what the model saw."""

    frames: int = video.DEFAULT_FRAMES
    rows: int | None = None
    cols: int | None = None
    save_tiles: Path | None = None


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand directories into their image and video files (sorted, non-recursive); keep files as given."""
    expanded: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            expanded += sorted(p for p in path.iterdir()
                               if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS.union(video.VIDEO_EXTENSIONS))
        else:
            expanded.append(path)
    return expanded


def find_media(directory: str | os.PathLike, image_id: int | str) -> Path | None:
    """The image or video file named `<image_id>.<ext>` in `directory` (any known extension), or None."""
    for extension in sorted(IMAGE_EXTENSIONS.union(video.VIDEO_EXTENSIONS)):
        candidate = Path(directory) / f"{image_id}{extension}"
        if candidate.is_file():
            return candidate
    return None


def describe(source: ImageInput, index: int) -> str:
    """A short name for an input, used in results and error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} #{index}>"


def array_to_image(array: np.ndarray) -> Image.Image:
    """An HxW, HxWx3 or HxWx4 array (uint8, or float in [0, 1]) as an RGB image."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise SmallCapError(f"image array has shape {array.shape}; expected HxW or HxWxC with C in 1, 3, 4")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise SmallCapError(f"image array has dtype {array.dtype}; expected uint8 or float in [0, 1]")
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert("RGB")


def load_image(source: ImageInput, video_options: VideoOptions | None = None,
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Load one input as an RGB image; a video file (recognised by content) becomes its tiled frames.

    An image file with more than `max_pixels` pixels (None: no limit) is refused from its header, so memory
    stays bounded. Raises SmallCapError naming the file and the reason when it cannot be read.
    """
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return array_to_image(source)
    if not isinstance(source, (str, os.PathLike)):
        raise SmallCapError(f"cannot caption a {type(source).__name__}; pass a file path, PIL image or array")
    path = Path(source)
    if not path.exists():
        raise SmallCapError(f"{path}: no such file")
    if path.is_dir():
        raise SmallCapError(f"{path}: is a directory")
    if video.is_video(path):
        options = video_options or VideoOptions()
        tile = video.load_video_as_image(path, frames=options.frames, rows=options.rows, cols=options.cols)
        if options.save_tiles is not None:
            video.save_tile(tile, path, options.save_tiles)
        return tile
    return decode_image(path, str(path), max_pixels)


def decode_image(source: str | os.PathLike | BinaryIO, name: str,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a still image (a path or a binary file object, `name` in messages) as RGB, refusing from its header
    one with more than `max_pixels` pixels (None: no limit). Raises SmallCapError naming `name`."""
    try:
        with _pixel_limit(max_pixels), Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise SmallCapError(f"{name}: {width}x{height} image has {width * height:,} pixels, more than the "
                                    f"{max_pixels:,}-pixel limit (raise it with --max-image-pixels)")
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise SmallCapError(f"{name}: not an image file (unrecognised format)") from None
    except OSError as error:
        raise SmallCapError(f"{name}: unreadable image ({error})") from None


class _pixel_limit:
    """Pillow's bomb check replaced by ours while opening: `max_pixels` is checked from the header instead
    (Pillow would warn above its limit and refuse above twice it, whatever the user set)."""

    def __init__(self, max_pixels: int | None):
        self.max_pixels = max_pixels

    def __enter__(self):
        self.saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        return self

    def __exit__(self, *exc) -> None:
        Image.MAX_IMAGE_PIXELS = self.saved
