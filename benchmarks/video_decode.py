"""What video input costs next to captioning: decode + tile a clip vs one captioning pass.

Generates H.264 clips (libx264 defaults but preset veryfast: a keyframe at least every 250 frames plus
scene cuts, B-frames) that pan over real COCO photos: a 60 s 1280x720 30 fps clip, and an MSR-VTT-like
20 s 320x240 30 fps one. Then, each in a fresh process so peak memory is per run:
- `read_frames` + `tile_frames` (4 frames, 2x2, 448 px) per strategy: seek / sequential / count;
- the captioning forward of the real-size architecture with random weights: CLIP ViT-B/32 vision tower
  on one 224x224 image (plus CLIP preprocessing of the tile), and GPT-2 small generating 25 tokens after a
  64-token prompt, greedy and with SmallCap's 3 beams.
Writes benchmarks/results/video_decode.json.

    PYTHONPATH=src python benchmarks/video_decode.py [--cache-dir DIR] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = Path(os.environ.get("SMALLCAP_SHARED", REPO.parent / "shared")) / "data" / "coco-mini"
FPS = 30
CLIPS = {"720p_60s": (1280, 720, 60), "msrvtt_like_240p_20s": (320, 240, 20)}  # width, height, seconds


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so a later peak excludes imports; False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    return _status_mib("VmHWM")


def timed(fn):
    """(result, wall seconds, CPU seconds of all the process's threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def generate_clip(path: Path, width: int, height: int, seconds: int) -> None:
    """Pan a window across mosaics of 8 real COCO photos (4/3 of the frame high), a new mosaic (a scene cut)
    each quarter of the clip, with a red square sliding over it."""
    import av
    import numpy as np
    from PIL import Image

    cell_w, cell_h = width // 2, height * 2 // 3
    photos = sorted((COCO_MINI / "train2017").glob("*.jpg"))
    mosaics = []
    for scene in range(4):
        cells = [np.asarray(Image.open(p).convert("RGB").resize((cell_w, cell_h), Image.Resampling.BICUBIC))
                 for p in photos[scene * 8:(scene + 1) * 8]]
        mosaics.append(np.concatenate([np.concatenate(cells[:4], 1), np.concatenate(cells[4:], 1)], 0))
    frames_per_scene = FPS * seconds // len(mosaics)
    square = height // 7
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for i in range(FPS * seconds):
            mosaic, k = mosaics[i // frames_per_scene], i % frames_per_scene
            x = k * (mosaic.shape[1] - width) // frames_per_scene
            y = (k * 2) % (mosaic.shape[0] - height)
            picture = np.ascontiguousarray(mosaic[y:y + height, x:x + width])
            left = (i * width // 180) % (width - square)
            picture[square // 2:square // 2 + square, left:left + square] = (255, 40, 40)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(stream.encode())


def worker_decode(clip: str, strategy: str) -> dict:
    from smallcap.video import read_frames, tile_frames

    peak_reset = reset_peak_rss()
    before = rss_mib()
    frames, decode_s, decode_cpu_s = timed(lambda: read_frames(clip, 4, strategy=strategy))
    tile, tile_s, tile_cpu_s = timed(lambda: tile_frames([f.image for f in frames], 2, 2))
    return {"wall_s": decode_s + tile_s, "cpu_s": decode_cpu_s + tile_cpu_s, "tile_wall_s": tile_s,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before, "peak_reset": peak_reset,
            "tile_size": tile.size, "timestamps": [round(f.time, 3) for f in frames]}


def worker_caption(reps: int) -> dict:
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    # One thread: on this shared 2-core machine two torch threads spin against other jobs and ran 10x slower.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=32)).eval()  # ViT-B/32 shape
    processor = CLIPImageProcessor()  # CLIP's defaults: resize 224 bicubic, center crop 224, CLIP mean/std
    gpt2 = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small shape
    tile = Image.new("RGB", (448, 448), (120, 80, 40))
    prompt = torch.randint(0, 50257, (1, 64))  # "Similar images show" + 4 retrieved captions is ~60-70 tokens

    def median_time(fn) -> dict:
        fn()  # warm-up
        runs = [timed(fn)[1:] for _ in range(reps)]
        return {"wall_s": statistics.median(r[0] for r in runs), "cpu_s": statistics.median(r[1] for r in runs)}

    def generate(beams: int):
        return gpt2.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, min_new_tokens=25,
                             num_beams=beams, do_sample=False, pad_token_id=0, eos_token_id=13)

    with torch.inference_mode():
        pixels = processor(images=tile, return_tensors="pt")["pixel_values"]
        result = {
            "clip_preprocess": median_time(lambda: processor(images=tile, return_tensors="pt")),
            "clip_vision_forward": median_time(lambda: vision(pixel_values=pixels)),
            "gpt2_greedy_25_tokens": median_time(lambda: generate(1)),
            "gpt2_beam3_25_tokens": median_time(lambda: generate(3)),
        }
    return {name: {k: round(v, 4) for k, v in times.items()} for name, times in result.items()} | {
        "torch_threads": torch.get_num_threads(), "reps": reps}


def run_worker(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    output = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                            env=env, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    return {
        "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 4),
        "cpu_s_median": round(statistics.median(r["cpu_s"] for r in runs), 4),
        "wall_s_runs": [round(r["wall_s"], 4) for r in runs],
        "tile_wall_s_median": round(statistics.median(r["tile_wall_s"] for r in runs), 4),
        "rss_before_mib": round(runs[0]["rss_before_mib"], 1),
        "peak_rss_increase_mib": round(max(r["peak_rss_mib"] - r["rss_before_mib"] for r in runs), 1),
        "peak_measured_from_before": all(r["peak_reset"] for r in runs),
        "timestamps": runs[0]["timestamps"],
    }


def clip_info(clip: Path) -> dict:
    import av

    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        keyframes = sum(1 for packet in container.demux(stream) if packet.is_keyframe)
        return {"width": stream.codec_context.width, "height": stream.codec_context.height,
                "fps": float(stream.average_rate), "frames": stream.frames,
                "duration_s": float(stream.duration * stream.time_base), "codec": stream.codec_context.name,
                "keyframes": keyframes, "size_mib": round(clip.stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="keep the generated clips here and reuse them")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "video_decode.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        result = worker_decode(*rest) if kind == "decode" else worker_caption(int(rest[0]))
        print(json.dumps(result))
        return

    # Nothing heavy is imported here: workers are fresh processes, each measured on its own.
    clips = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (width, height, seconds) in CLIPS.items():
            clip = (args.cache_dir or Path(tmp)) / f"clip_{name}.mp4"
            clip.parent.mkdir(parents=True, exist_ok=True)
            generate_s = None
            if not clip.exists():
                start = time.perf_counter()
                generate_clip(clip, width, height, seconds)
                generate_s = round(time.perf_counter() - start, 1)
            clips[name] = {"clip": clip_info(clip) | {"generate_s": generate_s}, "strategies": {
                strategy: summarise([run_worker("decode", str(clip), strategy) for _ in range(args.reps)])
                for strategy in ("seek", "sequential", "count")}}
    caption = run_worker("caption", str(max(args.reps, 5)))

    def share(video_s: float, generate: str, clock: str) -> float:
        model = sum(caption[part][f"{clock}_s"] for part in ("clip_preprocess", "clip_vision_forward", generate))
        return round(video_s / (video_s + model), 3)

    for result in clips.values():
        # video / (video + CLIP preprocess + CLIP vision forward + GPT-2 generate), per strategy and clock
        result["video_share_of_total"] = {
            f"{strategy}_{generate}_{clock}": share(result["strategies"][strategy][f"{clock}_s_median"],
                                                    f"gpt2_{generate}_25_tokens", clock)
            for strategy in ("seek", "sequential") for generate in ("greedy", "beam3") for clock in ("cpu", "wall")}
        info = result["clip"]
        result["whole_clip_decoded_in_memory_mib"] = round(info["frames"] * info["width"] * info["height"] * 3 / 2**20)

    import av
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "src"))
    from smallcap.io import atomic_write_json

    results = {
        "what": "decode + tile 4 frames (2x2, 448 px) of H.264 clips, in fresh processes, vs one captioning "
                "forward of the real-size architecture with random weights (torch on 1 thread)",
        "clips": clips,
        "captioning": caption,
        "environment": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                        "python": platform.python_version(), "av": av.__version__, "ffmpeg": av.ffmpeg_version_info,
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "note": "shared 2-core machine, other jobs running: CPU seconds are the steadier measure"},
    }
    atomic_write_json(args.out, results, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
