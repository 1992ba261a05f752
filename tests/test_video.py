"""Video input: real clips written with PyAV in-test, read back through `smallcap.video`.

Most clips show frame i in a background colour that encodes i (plus a moving square), so a test can tell
which frames were sampled from the pixels alone.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conftest import COCO_MINI
from smallcap.errors import SmallCapError
from smallcap.video import (
    grid_shape, is_video, list_split_videos, load_video_as_image, read_frames, sample_indices, sample_timestamps,
    save_tile, tile_frames,
)

FPS, N_FRAMES, W, H = 12, 24, 96, 64
STEP = 50  # colour step per index digit: survives lossy codecs and GIF's 8-level palette


def index_colour(i: int) -> tuple[int, int, int]:
    return STEP * (i % 6), STEP * (i // 6), 200


def colour_index(rgb) -> int:
    r, g = float(rgb[0]), float(rgb[1])
    return round(r / STEP) + 6 * round(g / STEP)


def frame_picture(i: int, width: int = W, height: int = H) -> np.ndarray:
    """Frame i: background `index_colour(i)`, top band untouched, a white square moving along the bottom."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = index_colour(i)
    side = height // 4
    x = (i * 3) % (width - side)
    image[height - side:, x:x + side] = 255
    return image


def band_index(image: Image.Image, box=None) -> int:
    """The frame index encoded in the top band of `image` (or of `box` within it)."""
    region = np.asarray(image.convert("RGB").crop(box or (0, 0, image.width, image.height)), np.float32)
    h, w = region.shape[:2]
    return colour_index(region[h // 10: h // 3, w // 4: 3 * w // 4].reshape(-1, 3).mean(0))


def write_clip(target, codec: str, pictures, fps: int = FPS, pix_fmt: str = "yuv420p", fmt: str | None = None,
               options: dict | None = None) -> None:
    """Encode RGB arrays as a video; `target` is a path or a writable file object."""
    pictures = list(pictures)
    with av.open(target if not isinstance(target, Path) else str(target), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = pictures[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = options or {}
        for picture in pictures:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode())


CODECS = {  # name: (file name, codec, pixel format, encoder options)
    "mp4-h264": ("clip.mp4", "libx264", "yuv420p", {"g": "6"}),  # several GOPs: seeking matters
    "mp4-mpeg4": ("clip_mpeg4.mp4", "mpeg4", "yuv420p", {"qscale": "2"}),
    "webm-vp8": ("clip.webm", "libvpx", "yuv420p", {"g": "6", "crf": "4", "b": "1M"}),
    "webm-vp9": ("clip_vp9.webm", "libvpx-vp9", "yuv420p", {"crf": "10", "b": "0", "deadline": "realtime"}),
    "avi-mjpeg": ("clip.avi", "mjpeg", "yuvj420p", {}),
    "mkv-h264": ("clip.mkv", "libx264", "yuv420p", {"g": "6"}),
    "gif": ("clip.gif", "gif", "rgb8", {}),
}


class _Unseekable(io.RawIOBase):
    """A write-only stream that cannot seek, so muxers cannot go back to write the duration."""

    def __init__(self, handle):
        self.handle = handle

    def writable(self):
        return True

    def write(self, data):
        return self.handle.write(data)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    pictures = [frame_picture(i) for i in range(N_FRAMES)]
    paths = {}
    for name, (filename, codec, pix_fmt, options) in CODECS.items():
        paths[name] = root / filename
        write_clip(paths[name], codec, pictures, pix_fmt=pix_fmt, options=options)
    paths["no-duration"] = root / "streamed.mkv"  # Matroska written to a pipe: no duration in the header
    with open(paths["no-duration"], "wb") as handle:
        write_clip(_Unseekable(handle), "libx264", pictures, fmt="matroska")
    paths["mpegts"] = root / "clip.ts"  # no magic bytes smallcap knows: detected by FFmpeg probing
    write_clip(paths["mpegts"], "mpeg4", pictures, fmt="mpegts", options={"qscale": "2"})
    paths["two-frames"] = root / "two.mp4"
    write_clip(paths["two-frames"], "libx264", [frame_picture(0), frame_picture(7)])
    return paths


# ------------------------------------------------------------------------------------------- frame choice

def test_sample_timestamps_are_segment_middles():
    assert sample_timestamps(2.0, 4) == [0.25, 0.75, 1.25, 1.75]
    assert sample_timestamps(10.0, 1) == [5.0]
    assert sample_indices(24, 4) == [3, 9, 15, 21]
    assert sample_indices(2, 4) == [0, 0, 1, 1]
    with pytest.raises(SmallCapError, match="at least 1"):
        sample_timestamps(2.0, 0)
    with pytest.raises(SmallCapError, match="positive"):
        sample_timestamps(0.0, 4)


@pytest.mark.parametrize("name", list(CODECS))
def test_read_frames_picks_the_frame_on_screen_at_each_segment_middle(clips, name):
    frames = read_frames(clips[name], 4)
    # 24 frames at 12 fps: t = 0.25, 0.75, 1.25, 1.75 s show frames 3, 9, 15, 21.
    assert [band_index(f.image) for f in frames] == [3, 9, 15, 21]
    assert [f.time for f in frames] == pytest.approx([0.25, 0.75, 1.25, 1.75], abs=0.011)  # GIF: centiseconds
    assert all(f.image.size == (W, H) and f.image.mode == "RGB" for f in frames)


@pytest.mark.parametrize("strategy", ["seek", "sequential", "count"])
@pytest.mark.parametrize("name", ["mp4-h264", "mkv-h264", "webm-vp8", "gif"])
def test_every_strategy_picks_the_same_frames(clips, name, strategy):
    frames = read_frames(clips[name], 6, strategy=strategy)
    assert [band_index(f.image) for f in frames] == [2, 6, 10, 14, 18, 22]


class _CountingContainer:
    """Wraps a PyAV input container to count seeks and decoded frames (skipped frames are not decoded)."""

    def __init__(self, container, log):
        self.container, self.log = container, log

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def seek(self, *args, **kwargs):
        self.log["seeks"] += 1
        return self.container.seek(*args, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.log["decoded"] += 1
            yield frame

    def demux(self, *args, **kwargs):
        for packet in self.container.demux(*args, **kwargs):
            yield _CountingPacket(packet, self.log)


class _CountingPacket:
    def __init__(self, packet, log):
        self.packet, self.log = packet, log

    def __getattr__(self, name):
        return getattr(self.packet, name)

    def decode(self):
        frames = self.packet.decode()
        self.log["decoded"] += len(frames)
        return frames


def _decode_work(monkeypatch, path, strategy):
    import smallcap.video as video

    log = {"seeks": 0, "decoded": 0}
    opener = video._open_video
    with monkeypatch.context() as patch:
        patch.setattr(video, "_open_video", lambda p: _CountingContainer(opener(p), log))
        frames = [band_index(f.image) for f in video.read_frames(path, 4, strategy=strategy)]
    return frames, log


def test_seeking_skips_decoding_between_keyframes_and_stops_when_it_cannot(monkeypatch, tmp_path):
    long = tmp_path / "long.mp4"  # 10 s, a keyframe every 2 s
    write_clip(long, "libx264", [frame_picture(i % 36) for i in range(120)],
               options={"g": "24", "x264-params": "scenecut=0"})
    by_seek, seek_log = _decode_work(monkeypatch, long, "seek")
    by_decoding, sequential_log = _decode_work(monkeypatch, long, "sequential")
    by_counting, count_log = _decode_work(monkeypatch, long, "count")
    assert by_seek == by_decoding == by_counting == [15 % 36, 45 % 36, 75 % 36, 105 % 36]
    # Targets 1.25/3.75/6.25/8.75 s: the index shows a keyframe before each of the last three.
    assert seek_log["seeks"] == 3 and sequential_log["seeks"] == 0
    assert seek_log["decoded"] < 0.7 * sequential_log["decoded"]
    # Counting decodes every frame up to the last target (106); reading by time skips the B-frames
    # that nothing references until shortly before each target, and still picks the same frames.
    assert count_log["decoded"] == 106 and sequential_log["decoded"] < 0.9 * count_log["decoded"]

    one_gop = tmp_path / "one_gop.mkv"  # a single keyframe and no index before the first seek
    write_clip(one_gop, "libx264", [frame_picture(i % 36) for i in range(48)], options={"x264-params": "scenecut=0"})
    _, log = _decode_work(monkeypatch, one_gop, "seek")
    assert log["seeks"] <= 1 and log["decoded"] <= 48


def test_missing_duration_falls_back_to_counting_frames(clips):
    with av.open(str(clips["no-duration"])) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    frames = read_frames(clips["no-duration"], 4)
    assert [band_index(f.image) for f in frames] == [3, 9, 15, 21]
    assert [f.time for f in frames] == pytest.approx([0.25, 0.75, 1.25, 1.75], abs=1e-3)


def test_truncated_stream_is_sampled_over_the_frames_that_remain(clips, tmp_path):
    # A cut-off download: the header still says 4 s, but only the first part of the frames survives.
    path = tmp_path / "cut.webm"
    write_clip(path, "libvpx", [frame_picture(i % 36) for i in range(48)], options={"g": "6", "crf": "4", "b": "1M"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        remaining = sum(1 for _ in container.decode(stream))
    assert 4 <= remaining < 40
    indices = [band_index(f.image) for f in read_frames(path, 4)]
    assert indices == sample_indices(remaining, 4)


def test_clip_shorter_than_requested_repeats_frames_with_a_warning(clips):
    with pytest.warns(UserWarning, match=r"two\.mp4: has only 2 distinct frame"):
        frames = read_frames(clips["two-frames"], 4)
    assert [band_index(f.image) for f in frames] == [0, 0, 7, 7]
    assert frames[0].image is frames[1].image


def test_large_frames_are_downscaled_as_decoded(tmp_path):
    path = tmp_path / "uhd.avi"
    write_clip(path, "mjpeg", [frame_picture(i, 3840, 2160) for i in range(3)], fps=3, pix_fmt="yuvj420p")
    frames = read_frames(path, 3, max_side=256)
    assert [f.image.size for f in frames] == [(256, 144)] * 3
    assert [band_index(f.image) for f in frames] == [0, 1, 2]
    assert read_frames(path, 1, max_side=None)[0].image.size == (3840, 2160)
    with pytest.raises(SmallCapError, match=r"uhd\.avi: resolution 3840x2160 is larger than"):
        read_frames(path, 3, max_pixels=1920 * 1080)


# ------------------------------------------------------------------------------------------------ tiling

def test_grid_shape():
    assert grid_shape(4) == (2, 2)
    assert grid_shape(1) == (1, 1)
    assert grid_shape(6) == (2, 3)
    assert grid_shape(9) == (3, 3)
    assert grid_shape(8, rows=1) == (1, 8)
    assert grid_shape(5, cols=2) == (3, 2)
    with pytest.raises(SmallCapError, match="2x2 grid cannot hold 6 frames"):
        grid_shape(6, 2, 2)


def test_tile_frames_fills_square_cells_row_major():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    frames = [Image.new("RGB", (160, 90), c) for c in colours[:4]]
    tile = tile_frames(frames, size=300)
    assert tile.size == (300, 300)
    for k, (x, y) in enumerate([(75, 75), (225, 75), (75, 225), (225, 225)]):
        assert tile.getpixel((x, y)) == colours[k]
    # Every frame fills its cell edge to edge: the aspect ratio is not kept, nothing is cropped or padded.
    assert tile.getpixel((0, 0)) == colours[0] and tile.getpixel((299, 299)) == colours[3]
    # 5 frames in a 2x3 grid of a 301-px square: uneven cells, the last cell stays black.
    tile = tile_frames([Image.new("RGB", (40, 40), c) for c in colours], rows=2, cols=3, size=301)
    assert tile.size == (301, 301)
    row = [tile.getpixel((x, 75)) for x in (0, 99, 100, 199, 200, 300)]
    assert row == [colours[0]] * 2 + [colours[1]] * 2 + [colours[2]] * 2
    assert tile.getpixel((50, 225)) == colours[3] and tile.getpixel((150, 225)) == colours[4]
    assert tile.getpixel((250, 225)) == (0, 0, 0)


def test_load_video_as_image_tiles_the_sampled_frames(clips):
    tile = load_video_as_image(clips["mp4-h264"])
    assert tile.size == (448, 448) and tile.mode == "RGB"
    cells = [(0, 0, 224, 224), (224, 0, 448, 224), (0, 224, 224, 448), (224, 224, 448, 448)]
    assert [band_index(tile, box) for box in cells] == [3, 9, 15, 21]
    tile = load_video_as_image(clips["webm-vp8"], frames=8, rows=4, cols=2, size=400)
    cells = [(c * 200, r * 100, (c + 1) * 200, (r + 1) * 100) for r in range(4) for c in range(2)]
    assert [band_index(tile, box) for box in cells] == sample_indices(24, 8)


def test_tile_shows_the_real_photos_of_a_slideshow(tmp_path):
    # A clip of 8 real COCO photos, 3 frames each: the 4 tiles must be photos 1, 3, 5, 7 (frames 3, 9, 15, 21).
    photos = [Image.open(p).convert("RGB").resize((320, 240))
              for p in sorted((COCO_MINI / "val2017").glob("*.jpg"))[:8]]
    path = tmp_path / "slideshow.mp4"
    write_clip(path, "libx264", [np.asarray(photo) for photo in photos for _ in range(3)], options={"crf": "12"})
    tile = np.asarray(load_video_as_image(path), np.float32)
    expected = [np.asarray(photo.resize((224, 224), Image.Resampling.BICUBIC), np.float32) for photo in photos]
    for k, (y, x) in enumerate([(0, 0), (0, 224), (224, 0), (224, 224)]):
        cell = tile[y:y + 224, x:x + 224]
        errors = [np.abs(cell - photo).mean() for photo in expected]
        assert int(np.argmin(errors)) == 2 * k + 1 and errors[2 * k + 1] < 8, errors


def test_save_tile_writes_a_png_named_after_the_source(clips, tmp_path):
    tile = load_video_as_image(clips["avi-mjpeg"])
    out = save_tile(tile, clips["avi-mjpeg"], tmp_path / "tiles")
    assert out == tmp_path / "tiles" / "clip.avi.png"
    with Image.open(out) as saved:
        assert saved.format == "PNG" and np.array_equal(np.asarray(saved), np.asarray(tile))
    assert [p.name for p in out.parent.iterdir()] == ["clip.avi.png"]  # no temporary file left behind


# --------------------------------------------------------------------------------------------- detection

def test_is_video_judges_content_not_extension(clips, tmp_path):
    for name in [*CODECS, "no-duration", "mpegts", "two-frames"]:
        assert is_video(clips[name]), name
    renamed = tmp_path / "clip.bin"
    shutil.copy(clips["mp4-h264"], renamed)
    assert is_video(renamed)

    photo = sorted((COCO_MINI / "val2017").glob("*.jpg"))[0]
    assert not is_video(photo)
    disguised = tmp_path / "photo.mp4"
    shutil.copy(photo, disguised)
    assert not is_video(disguised)
    Image.open(photo).save(tmp_path / "photo.png")
    assert not is_video(tmp_path / "photo.png")
    Image.open(photo).convert("P").save(tmp_path / "still.gif")  # a one-frame GIF is a picture
    assert not is_video(tmp_path / "still.gif")

    (tmp_path / "notes.txt").write_text("a man riding a horse.\n" * 50)
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    for name in ["notes.txt", "noise.mp4", "empty.mp4", "does-not-exist.mp4"]:
        assert not is_video(tmp_path / name), name


# ------------------------------------------------------------------------------------------- bad input

def _no_frames_avi(path: Path) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        out.start_encoding()


def test_bad_videos_raise_errors_naming_file_and_reason(clips, tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    _no_frames_avi(tmp_path / "noframes.avi")
    data = clips["mp4-h264"].read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    (tmp_path / "noise.webm").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 8)
    # The AVI's codec tag rewritten to one FFmpeg has no decoder for.
    (tmp_path / "unknown_codec.avi").write_bytes(clips["avi-mjpeg"].read_bytes().replace(b"MJPG", b"ZZZZ"))
    expected = {
        "zero.mp4": "the file is empty",
        "noframes.avi": "contains no video frames",
        "truncated.mp4": "not a readable video, corrupt",
        "noise.webm": "not a readable video, corrupt",
        "unknown_codec.avi": "codec is not supported",
        "missing.mp4": "no such video file",
    }
    for name, reason in expected.items():
        with pytest.raises(SmallCapError, match=reason) as caught:
            load_video_as_image(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)
    assert is_video(tmp_path / "truncated.mp4") and is_video(tmp_path / "unknown_codec.avi")


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "sound.mka"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        samples = np.zeros((1, 800), np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(SmallCapError, match=r"sound\.mka: has no video stream"):
        read_frames(path)


def test_frame_count_must_be_positive(clips):
    with pytest.raises(SmallCapError, match="at least 1"):
        read_frames(clips["mp4-h264"], 0)


# --------------------------------------------------------------------------------------- MSR-VTT splits

def _msrvtt(tmp_path: Path, clips) -> tuple[Path, Path]:
    videos = [{"video_id": f"video{i}", "split": s, "category": 0, "url": "", "id": i}
              for i, s in enumerate(["train", "train", "validate", "test", "test"])]
    sentences = [{"video_id": v["video_id"], "caption": "a clip", "sen_id": i} for i, v in enumerate(videos)]
    annotations = tmp_path / "train_val_test_videodatainfo.json"
    annotations.write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    video_dir = tmp_path / "TrainValVideo"
    video_dir.mkdir()
    for i, name in enumerate(["mp4-h264", "mp4-mpeg4", "webm-vp8", "avi-mjpeg", "mp4-h264"]):
        shutil.copy(clips[name], video_dir / f"video{i}{clips[name].suffix}")
    (video_dir / "video3.txt").write_text("not a video")
    return annotations, video_dir


def test_list_split_videos_maps_ids_to_files(clips, tmp_path):
    annotations, video_dir = _msrvtt(tmp_path, clips)
    test = list_split_videos(annotations, video_dir, "test")
    assert test == [("video3", video_dir / "video3.avi"), ("video4", video_dir / "video4.mp4")]
    assert list_split_videos(annotations, video_dir, "val") == [("video2", video_dir / "video2.webm")]
    assert [v for v, _ in list_split_videos(annotations, video_dir)] == [f"video{i}" for i in range(5)]
    # What `predict` will do with them: every listed file loads as a tile.
    assert all(load_video_as_image(path).size == (448, 448) for _, path in test)

    csv_list = tmp_path / "MSRVTT_JSFUSION_test.csv"
    csv_list.write_text("key,vid_key,video_id,sentence\nret0,msr7,video4,a clip\nret1,msr3,video1,a clip\n")
    assert list_split_videos(csv_list, video_dir) == [("video4", video_dir / "video4.mp4"),
                                                      ("video1", video_dir / "video1.mp4")]


def test_list_split_videos_reports_missing_files_and_bad_annotations(clips, tmp_path):
    annotations, video_dir = _msrvtt(tmp_path, clips)
    (video_dir / "video0.mp4").unlink()
    with pytest.raises(SmallCapError, match=r"no video file for 1 of 2 videos .*video0\.mp4"):
        list_split_videos(annotations, video_dir, "train")
    with pytest.warns(UserWarning, match="skipping"):
        assert [v for v, _ in list_split_videos(annotations, video_dir, "train", allow_missing=True)] == ["video1"]
    with pytest.raises(SmallCapError, match=r"no videos in split 'dev' \(splits present: test, train, validate\)"):
        list_split_videos(annotations, video_dir, "dev")
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
    with pytest.raises(SmallCapError, match="captions.json: expected MSR-VTT annotations"):
        list_split_videos(bad, video_dir)
    with pytest.raises(SmallCapError, match="video directory not found"):
        list_split_videos(annotations, tmp_path / "nowhere")


# ------------------------------------------------------------------------------- captioning video inputs


@pytest.mark.slow
def test_videos_and_images_captioned_together_through_cli_and_api(tmp_path):
    """A clip made of four real COCO photos (one per segment) is captioned like its 2x2 tile."""
    from conftest import GOLDEN, run_cli
    from smallcap.captioner import Captioner

    photos = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:5]
    segments = [np.asarray(Image.open(p).convert("RGB").resize((320, 240))) for p in photos[1:5]]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_clip(inputs / "clip.mp4", "libx264", [s for s in segments for _ in range(6)])
    (inputs / "empty.mp4").write_bytes(b"")
    shutil.copy(photos[0], inputs / photos[0].name)
    tiles = tmp_path / "tiles"
    out = tmp_path / "captions.jsonl"
    result = run_cli("caption", inputs, "--model", GOLDEN, "--no-retrieval", "--save-tiles", tiles,
                     "--output", out, check=False)
    assert result.returncode == 1 and "empty.mp4" in result.stderr
    rows = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"clip.mp4", "empty.mp4", photos[0].name}
    assert "error" in rows["empty.mp4"] and rows[photos[0].name]["caption"] is not None
    tile = Image.open(tiles / "clip.mp4.png").convert("RGB")
    assert tile.size == (448, 448)
    for quadrant, segment in enumerate(segments):  # each quadrant shows the frame of its own segment
        box = ((quadrant % 2) * 224, (quadrant // 2) * 224)
        cell = np.asarray(tile.crop((*box, box[0] + 224, box[1] + 224)).resize((320, 240)), dtype=float)
        errors = [np.abs(cell - other).mean() for other in segments]
        assert int(np.argmin(errors)) == quadrant
    captioner = Captioner.from_pretrained(str(GOLDEN), use_retrieval=False)
    via_api = captioner([inputs / "clip.mp4"])[0].caption
    assert via_api == rows["clip.mp4"]["caption"] == captioner([tile])[0].caption
