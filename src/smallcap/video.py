"""Video input, SmallCap's MSR-VTT recipe: sample frames evenly over a clip and tile them into one image.

The image captioner then captions the tile like any photo (training-free; paper §5).

- Frame choice: the clip is cut into n equal segments and the frame *on screen* at the middle of each is
  taken, t_i = (i + 0.5) * duration / n (the last frame starting at or before t_i). Without duration
  metadata the frames are counted instead and frame floor((i + 0.5) * count / n) is taken.
- Bounded memory: frames are decoded one at a time, only the chosen ones are kept, and each is scaled down
  by FFmpeg's scaler as it is converted (`max_side`), so a 4K clip costs one decoded frame, not a clip.
- Seeking: before each sampled time the reader seeks to the preceding keyframe when that skips work,
  and decodes forward otherwise (see `_read_by_time`); on the way it skips non-reference frames. Files whose timestamps cannot be trusted (no
  duration, a truncated download, a seek that overshoots) are read by counting frames instead.
- Clips with fewer distinct frames than requested repeat frames (with a warning) rather than fail: a
  2-frame clip still gives a full grid, and one odd clip does not stop a whole evaluation run.
- Tiling: the tile is a square of side `size`; every frame is resized, aspect ratio *not* kept, to exactly
  fill its cell (row-major), so CLIP's resize + center crop later sees every frame whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from PIL import Image

from smallcap.errors import MissingExtraError, SmallCapError, require_extra
from smallcap.io import atomic_write_bytes

DEFAULT_FRAMES = 4
DEFAULT_TILE_SIZE = 448  # CLIP ViT-B/32 resizes it to 224; a 448-px retrieval encoder (RN50x64) sees it whole.
MAX_PIXELS = 8192 * 8192  # refuse frames larger than this before decoding one (decoder buffers would be GBs)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".gif", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")

# Demuxers that hold real video (FFmpeg also "opens" a JPEG as a one-frame video via jpeg_pipe/image2).
_VIDEO_DEMUXERS = {"mov", "mp4", "3gp", "matroska", "webm", "avi", "gif", "mpeg", "mpegts", "mpegvideo",
                   "flv", "asf", "ogg", "h264", "hevc", "m4v", "ivf", "nut", "rm", "dv"}
_IMAGE_FTYP_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
_AUDIO_FTYP_BRANDS = {b"M4A ", b"M4B ", b"M4P "}


@dataclass(frozen=True)
class VideoFrame:
    """A decoded, downscaled frame and the time it is shown, in seconds from the clip's start."""

    image: Image.Image
    time: float


def _av():
    """PyAV, imported on first use so that captioning photos never needs it (the `video` extra installs it)."""
    return require_extra("av", "video", "Reading video files")


# --------------------------------------------------------------------------------------------- detection

def _sniff(header: bytes) -> str | None:
    """'image', 'video', 'gif' or None (unknown) from a file's first bytes."""
    if header.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")):
        return "image"
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "image"
    if header.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if header[4:8] == b"ftyp":  # ISO base media: mp4, mov, 3gp, but also HEIF/AVIF stills and m4a audio
        brand = header[8:12]
        return "image" if brand in _IMAGE_FTYP_BRANDS else None if brand in _AUDIO_FTYP_BRANDS else "video"
    if header.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: Matroska / WebM
        return "video"
    if header[:4] == b"RIFF" and header[8:12] in (b"AVI ", b"AVIX"):
        return "video"
    return None


def _probe_has_video(path: Path) -> bool:
    """Whether FFmpeg opens `path` as a video container with a real (not cover-art) video stream."""
    try:
        av = _av()
    except MissingExtraError:
        # Without FFmpeg a file we cannot sniff is a video only by its name; loading it then names the extra.
        return path.suffix.lower() in VIDEO_EXTENSIONS
    try:
        with av.open(str(path)) as container:
            if not set(container.format.name.split(",")) & _VIDEO_DEMUXERS:
                return False
            return any(not stream.disposition & av.stream.Disposition.attached_pic
                       for stream in container.streams.video)
    except (av.FFmpegError, OSError, ValueError):
        return False


def is_video(path: str | os.PathLike) -> bool:
    """Whether `path` holds a video, judged by its content (magic bytes, then FFmpeg probing), not its name.

    Animated GIFs are videos, single-frame GIFs are images. A file whose signature says "video container"
    counts as a video even when it is corrupt, so that `read_frames` reports what is wrong with it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            header = handle.read(16)
    except OSError:
        return False
    kind = _sniff(header)
    if kind == "gif":
        try:
            with Image.open(path) as image:
                return bool(getattr(image, "is_animated", False))
        except OSError:
            return True
    if kind is not None:
        return kind == "video"
    return bool(header) and _probe_has_video(path)


# ------------------------------------------------------------------------------------------------ sampling

def sample_timestamps(duration: float, n: int) -> list[float]:
    """n times evenly spaced over a clip of `duration` seconds: the middle of each of n equal segments."""
    if n < 1:
        raise SmallCapError(f"the number of frames must be at least 1, got {n}")
    if not duration > 0:
        raise SmallCapError(f"the clip duration must be positive, got {duration}")
    return [(i + 0.5) * duration / n for i in range(n)]


def sample_indices(count: int, n: int) -> list[int]:
    """The frame-count analogue of `sample_timestamps`: frame floor((i + 0.5) * count / n) for each i."""
    if n < 1:
        raise SmallCapError(f"the number of frames must be at least 1, got {n}")
    return [math.floor((i + 0.5) * count / n) for i in range(n)]


def read_frames(path: str | os.PathLike, n: int = DEFAULT_FRAMES, *, max_side: int | None = DEFAULT_TILE_SIZE,
                strategy: str = "auto", max_pixels: int = MAX_PIXELS) -> list[VideoFrame]:
    """Decode the n frames `sample_timestamps` picks from the video at `path`, in clip order.

    Frames are scaled down while being converted so that neither side exceeds `max_side` (aspect ratio
    kept; None keeps full size). `strategy`: "auto" (= "seek") seeks to keyframes where that saves
    decoding, "sequential" decodes from the start, "count" counts frames and picks by index. Time-based
    reading falls back to counting when the container has no duration or the stream ends well before it
    (a truncated file). Raises SmallCapError naming the file for corrupt, empty, undecodable or oversized
    video; warns when the clip has fewer distinct frames than n (frames are then repeated).
    """
    if strategy not in ("auto", "seek", "sequential", "count"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if n < 1:
        raise SmallCapError(f"{path}: the number of frames must be at least 1, got {n}")
    path = Path(path)
    av = _av()
    try:
        frames = None
        with _open_video(path) as container:
            stream = _video_stream(container, path, max_pixels)
            duration = _duration(container, stream)
            if duration is not None and strategy != "count":
                targets = sample_timestamps(duration, n)
                convert = _Converter(stream, max_side)
                frames = _read_by_time(container, stream, targets, convert, seek=strategy != "sequential")
        if frames is None:
            frames, count, interval = _read_by_count(path, n, max_side, max_pixels)
            if duration is not None and count * interval < 0.9 * duration:
                warnings.warn(f"{path}: only {count} frames ({count * interval:.1f} s) could be read although the "
                              f"file says it lasts {duration:.1f} s; it may be truncated or damaged, so the "
                              "frames were sampled over the part that remains", stacklevel=2)
    except av.FFmpegError as error:
        raise SmallCapError(f"{path}: cannot decode video ({_reason(error)})") from error
    if not frames:
        raise SmallCapError(f"{path}: contains no decodable video frames")
    distinct = len({id(frame.image) for frame in frames})
    if distinct < n:
        warnings.warn(f"{path}: has only {distinct} distinct frame(s) where {n} were requested; repeating frames",
                      stacklevel=2)
    return frames


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


def _open_video(path: Path):
    if not path.is_file():
        raise SmallCapError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise SmallCapError(f"{path}: the file is empty (0 bytes)")
    av = _av()
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:  # garbled metadata fails to decode as text
        raise SmallCapError(f"{path}: not a readable video, corrupt or not a video container "
                            f"({_reason(error)})") from error


def _video_stream(container, path: Path, max_pixels: int):
    av = _av()
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise SmallCapError(f"{path}: has no video stream (or its stream headers are damaged)")
    stream = streams[0]
    if stream.codec_context is None:
        raise SmallCapError(f"{path}: its video stream cannot be decoded: the file is damaged or its codec is not "
                            f"supported by this FFmpeg build (PyAV {av.__version__}); if it plays elsewhere, "
                            "re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
        raise SmallCapError(f"{path}: resolution {width}x{height} is larger than the {max_pixels:,}-pixel limit; "
                            "downscale the video first")
    stream.thread_type = "AUTO"  # frame + slice threads
    return stream


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / _av().time_base
    else:
        return None
    return seconds if seconds > 0 else None


class _Converter:
    """av.VideoFrame -> VideoFrame, downscaled by FFmpeg's scaler; the last result is reused for repeats."""

    def __init__(self, stream, max_side: int | None):
        self.start = stream.start_time or 0
        self.time_base = stream.time_base or Fraction(1, 1)
        # Timestamps are rounded to whole ticks (1 ms in Matroska, 10 ms in GIF): a frame stamped less
        # than half a tick after a target time may have started at it. (Not a full half: in AVI a tick is
        # a frame, and n = frame count puts targets exactly half a frame before the next frame.)
        self.tolerance = float(self.time_base) * 0.499
        rate = stream.average_rate or stream.guessed_rate
        self.frame_interval = float(1 / rate) if rate else 0.1
        self.max_side = max_side
        self.last: tuple[object, VideoFrame] | None = None

    def time(self, frame) -> float | None:
        """Seconds since the stream's start, None when the frame has no timestamp."""
        return None if frame.pts is None else float((frame.pts - self.start) * self.time_base)

    def pts(self, seconds: float) -> int:
        return self.start + int(seconds / self.time_base)

    def __call__(self, frame, fallback_time: float) -> VideoFrame:
        if self.last is not None and self.last[0] is frame:
            return self.last[1]
        width, height = frame.width, frame.height
        scale = 1.0 if self.max_side is None else min(1.0, self.max_side / max(width, height))
        if scale < 1:
            size = dict(width=max(1, round(width * scale)), height=max(1, round(height * scale)))
            image = frame.to_image(**size, interpolation="AREA")
        else:
            image = frame.to_image()
        time = self.time(frame)
        result = VideoFrame(image, fallback_time if time is None else time)
        self.last = (frame, result)
        return result


class _Decoder:
    """Decoded frames in display order. Non-reference frames more than `margin` seconds before the current
    target are not decoded: no later frame depends on them and they are too early to be sampled. For
    H.264 with B-frames this saves about 40% of the decoding on the way from a keyframe to a target."""

    def __init__(self, container, stream, convert: _Converter):
        self.container, self.stream, self.convert = container, stream, convert
        self.margin = max(8 * convert.frame_interval, 0.25)
        self.full_from: int | None = None  # pts from which every frame is decoded
        self.frames = self._decode()

    def aim(self, target: float) -> None:
        self.full_from = self.convert.pts(target - self.margin)

    def seek(self, target: float) -> None:
        self.container.seek(self.convert.pts(target), stream=self.stream, backward=True)
        self.frames = self._decode()

    def next(self):
        return next(self.frames, None)

    def _decode(self):
        context = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            early = packet.pts is not None and self.full_from is not None and packet.pts < self.full_from
            context.skip_frame = "NONREF" if early else "DEFAULT"
            yield from packet.decode()


def _read_by_time(container, stream, targets: list[float], convert: _Converter, seek: bool) -> list[VideoFrame] | None:
    """For each target time (ascending), the frame on screen then: the last frame starting at or before it.

    With `seek`, the reader jumps to the keyframe before a target unless the container's index shows no
    keyframe between the current position and the target (then decoding on is cheaper). Without an index
    it seeks, and stops seeking once a seek lands at or before where decoding already was.
    Returns None when time-based reading cannot be trusted: a seek landed after its target or past the
    end, or the stream ended well before a target (the duration metadata overstates the clip).
    """
    chosen: list[VideoFrame] = []
    decoder = _Decoder(container, stream, convert)
    shown = ahead = None  # the last frame starting at or before the target, and the frame after it
    seeking_helps, seeked = True, False
    for target in targets:
        position = None if shown is None else convert.time(shown)
        decoder.aim(target)
        just_seeked = seek and seeking_helps and _should_seek(stream, convert, position, target, seeked)
        if just_seeked:
            seeked = True
            decoder.seek(target)
            shown = ahead = None
        while ahead is None or (convert.time(ahead) or 0.0) <= target + convert.tolerance:
            if ahead is not None:
                shown = ahead
            ahead = decoder.next()
            if ahead is None:
                break
            if just_seeked and shown is None:  # the frame a seek landed on
                landed = convert.time(ahead) or 0.0
                if landed > target + convert.tolerance:
                    return None
                if position is not None and landed <= position:
                    seeking_helps = False
        if shown is None and ahead is not None:
            shown = ahead  # the target lies before the first frame's timestamp
        if shown is None:
            return None if just_seeked else []
        if ahead is None and target - (convert.time(shown) or 0.0) > 2 * convert.frame_interval:
            return None
        chosen.append(convert(shown, target))
    return chosen


def _should_seek(stream, convert: _Converter, position: float | None, target: float, seeked: bool) -> bool:
    entries = stream.index_entries
    if len(entries) < (1 if seeked else 2):  # no index (yet): Matroska reads its cues on the first seek
        return True
    low = convert.start if position is None else convert.pts(position)
    high = convert.pts(target)
    # Index timestamps are decode times, a few frames before display times with B-frames: near enough.
    return any(entry.is_keyframe and low < entry.timestamp <= high for entry in entries)


def _read_by_count(path: Path, n: int, max_side: int | None, max_pixels: int) -> tuple[list[VideoFrame], int, float]:
    """Count the frames (demuxing only, no decoding), then decode from the start up to the chosen indices.

    Returns the frames, the frame count and the frame interval in seconds."""
    with _open_video(path) as container:
        stream = _video_stream(container, path, max_pixels)
        count = sum(1 for packet in container.demux(stream) if packet.size)
    if count == 0:
        raise SmallCapError(f"{path}: contains no video frames")
    wanted = sample_indices(count, n)
    chosen: list[VideoFrame] = []
    with _open_video(path) as container:  # reopened rather than rewound: not every demuxer can seek
        stream = _video_stream(container, path, max_pixels)
        convert = _Converter(stream, max_side)
        last = None
        for index, frame in enumerate(container.decode(stream)):
            while len(chosen) < n and wanted[len(chosen)] == index:
                chosen.append(convert(frame, index * convert.frame_interval))
            if len(chosen) == n:
                break
            last = frame
        while last is not None and len(chosen) < n:  # fewer decodable frames than packets
            chosen.append(convert(last, 0.0))
    return chosen, count, convert.frame_interval


# ------------------------------------------------------------------------------------------------- tiling

def grid_shape(n: int, rows: int | None = None, cols: int | None = None) -> tuple[int, int]:
    """Rows and columns for n frames: as given, else the squarest grid (4 -> 2x2, 6 -> 2x3, 9 -> 3x3)."""
    if rows is None and cols is None:
        rows = max(1, math.isqrt(n))
    if cols is None:
        cols = math.ceil(n / rows)
    if rows is None:
        rows = math.ceil(n / cols)
    if rows < 1 or cols < 1 or rows * cols < n:
        raise SmallCapError(f"a {rows}x{cols} grid cannot hold {n} frames")
    return rows, cols


def tile_frames(frames: Sequence[Image.Image], rows: int | None = None, cols: int | None = None,
                size: int = DEFAULT_TILE_SIZE) -> Image.Image:
    """Tile frames row-major into a square RGB image of side `size`; the grid defaults to `grid_shape`.

    Each frame is resized (bicubic, aspect ratio not kept) to exactly fill its cell, about
    (size/cols) x (size/rows), so a later resize + center crop to a square keeps every frame whole.
    Cells beyond the last frame stay black.
    """
    if not frames:
        raise SmallCapError("no frames to tile")
    rows, cols = grid_shape(len(frames), rows, cols)
    tile = Image.new("RGB", (size, size))
    for k, frame in enumerate(frames):
        row, col = divmod(k, cols)
        left, right = col * size // cols, (col + 1) * size // cols
        top, bottom = row * size // rows, (row + 1) * size // rows
        cell = frame.convert("RGB").resize((right - left, bottom - top), Image.Resampling.BICUBIC)
        tile.paste(cell, (left, top))
    return tile


def load_video_as_image(path: str | os.PathLike, frames: int = DEFAULT_FRAMES, rows: int | None = None,
                        cols: int | None = None, size: int = DEFAULT_TILE_SIZE) -> Image.Image:
    """The captioner's entry point: `frames` evenly sampled frames tiled into one RGB square of side `size`.

    The grid defaults to `grid_shape(frames)` (2x2 for 4). Raises SmallCapError naming the file and the
    reason for a video that cannot be used; warns (and repeats frames) for a clip with too few frames.
    """
    rows, cols = grid_shape(frames, rows, cols)
    sampled = read_frames(path, frames, max_side=size)
    return tile_frames([frame.image for frame in sampled], rows, cols, size)


def save_tile(image: Image.Image, source_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the tiled image atomically as `out_dir/<source file name>.png` (`clip.mp4` -> `clip.mp4.png`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    target = Path(out_dir) / f"{Path(source_path).name}.png"
    atomic_write_bytes(target, buffer.getvalue())
    return target


# ------------------------------------------------------------------------------------------ MSR-VTT splits

_SPLIT_ALIASES = {"val": "validate", "valid": "validate", "validation": "validate"}


def list_split_videos(annotations: str | os.PathLike, video_dir: str | os.PathLike, split: str | None = None,
                      allow_missing: bool = False) -> list[tuple[str, Path]]:
    """(video_id, file) for each video of an MSR-VTT split, in annotation order.

    `annotations`: the official MSR-VTT JSON (`{"videos": [{"video_id", "split"}...], "sentences": [...]}`;
    splits "train", "validate" (alias "val") and "test"; `split=None` takes every video), or a CSV with a
    `video_id` column (e.g. the 1k-A test list). The file of `video0` is `video_dir/video0.<ext>` for a
    video extension (mp4 first). Missing files are an error, or skipped with a warning if `allow_missing`.
    """
    annotations, video_dir = Path(annotations), Path(video_dir)
    ids = _split_video_ids(annotations, _SPLIT_ALIASES.get(split, split))
    if not video_dir.is_dir():
        raise SmallCapError(f"{video_dir}: video directory not found")
    files: dict[str, Path] = {}
    for entry in sorted(video_dir.iterdir(), key=lambda p: VIDEO_EXTENSIONS.index(p.suffix.lower())
                        if p.suffix.lower() in VIDEO_EXTENSIONS else len(VIDEO_EXTENSIONS)):
        if entry.suffix.lower() in VIDEO_EXTENSIONS:
            files.setdefault(entry.stem, entry)
    missing = [video_id for video_id in ids if video_id not in files]
    if missing:
        message = (f"{video_dir}: no video file for {len(missing)} of {len(ids)} videos in {annotations.name}"
                   f" (e.g. {', '.join(missing[:3])}; expected e.g. {missing[0]}.mp4)")
        if not allow_missing:
            raise SmallCapError(message)
        warnings.warn(message + "; skipping them", stacklevel=2)
    return [(video_id, files[video_id]) for video_id in ids if video_id in files]


def _split_video_ids(annotations: Path, split: str | None) -> list[str]:
    if not annotations.is_file():
        raise SmallCapError(f"{annotations}: annotation file not found")
    if annotations.suffix.lower() == ".csv":
        with open(annotations, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if "video_id" not in (reader.fieldnames or []):
                raise SmallCapError(f"{annotations}: expected a CSV header with a 'video_id' column")
            if split is not None:
                raise SmallCapError(f"{annotations}: a CSV video list has no splits; drop the split ({split!r})")
            return list(dict.fromkeys(row["video_id"] for row in reader))
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SmallCapError(f"{annotations}: not valid JSON ({error})") from error
    videos = data.get("videos") if isinstance(data, dict) else None
    if not isinstance(videos, list) or not all(isinstance(v, dict) and "video_id" in v for v in videos):
        raise SmallCapError(f"{annotations}: expected MSR-VTT annotations, a JSON object with a 'videos' list of "
                            "{'video_id': ..., 'split': ...} entries")
    if split is None:
        return [str(v["video_id"]) for v in videos]
    found = {v.get("split") for v in videos}
    if split not in found:
        raise SmallCapError(f"{annotations}: no videos in split {split!r} (splits present: "
                            f"{', '.join(sorted(map(str, found)))})")
    return [str(v["video_id"]) for v in videos if v.get("split") == split]
