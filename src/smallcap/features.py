"""The encoder-state cache: the CLIP states SmallCap's decoder attends to, computed once and read lazily.

A cache directory holds `manifest.json` (which encoder made it), `index.json` (image id -> shard and row, plus
the images that could not be decoded) and `shard-NNNNN.npy` arrays of shape (images, tokens, width). Shards
are written atomically and `index.json` is rewritten after each one, so a killed extraction continues from
its last complete shard. Arrays are memory-mapped, so a cache larger than RAM trains fine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig, CLIPVisionModel

from smallcap.data import load_json
from smallcap.errors import SmallCapError
from smallcap.hub import explain_load_errors, resolve_pretrained
from smallcap.io import atomic_open, atomic_write_json
from smallcap.loading import load_image_processor
from smallcap.modeling import load_smallcap
from smallcap.training_data import read_training_samples

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """sha256 over the names, shapes and float32 values of the encoder's parameters and buffers.

    Hashing every tensor (not a sample of them) also tells apart encoders that differ only in late layers.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.is_floating_point():
            tensor = tensor.float()
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class EncoderInfo:
    """What identifies the encoder that made a cache: its name, width and weights fingerprint."""

    name: str
    hidden_size: int
    fingerprint: str

    @classmethod
    def of(cls, encoder: torch.nn.Module, name: str | None = None) -> "EncoderInfo":
        """Describe a CLIP vision encoder (a `CLIPVisionModel`)."""
        name = name or getattr(encoder.config, "_name_or_path", "") or type(encoder).__name__
        return cls(str(name), int(encoder.config.hidden_size), encoder_fingerprint(encoder))


@dataclass
class ExtractionReport:
    """What an extraction did: images newly encoded, already cached, and skipped as undecodable."""

    encoded: int = 0
    cached: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


class FeatureCache(Mapping):
    """Read-only view of a cache directory: `cache[image_id]` is a (tokens, width) array, memory-mapped."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            raise SmallCapError(f"{self.directory} is not a feature cache (no {MANIFEST}); "
                                "make one with `smallcap features extract`")
        self.manifest = load_json(manifest_path, "feature cache manifest")
        if self.manifest.get("format") != FORMAT_VERSION:
            raise SmallCapError(f"{manifest_path} has cache format {self.manifest.get('format')!r}; "
                                f"this version reads format {FORMAT_VERSION}")
        index = load_json(self.directory / INDEX, "feature cache index") if (self.directory / INDEX).exists() else {}
        self._rows: dict[str, tuple[int, int]] = {k: (int(s), int(r)) for k, (s, r) in index.get("rows", {}).items()}
        self.skipped: dict[str, str] = dict(index.get("skipped", {}))
        self.num_shards = int(index.get("num_shards", 0))
        self._shards: dict[int, np.ndarray] = {}

    @property
    def encoder(self) -> EncoderInfo:
        """The encoder recorded in the manifest."""
        return EncoderInfo(**self.manifest["encoder"])

    def check_encoder(self, expected: EncoderInfo) -> None:
        """Refuse a cache made by another encoder: its states mean nothing to a decoder trained on this one."""
        have = self.encoder
        if have.fingerprint != expected.fingerprint or have.hidden_size != expected.hidden_size:
            raise SmallCapError(
                f"the feature cache {self.directory} was made with another encoder ({have.name!r}, width "
                f"{have.hidden_size}, weights {have.fingerprint[:12]}) than the one in use ({expected.name!r}, "
                f"width {expected.hidden_size}, weights {expected.fingerprint[:12]}); use another cache directory "
                "or extract the features again")

    def _shard(self, number: int) -> np.ndarray:
        if number not in self._shards:
            self._shards[number] = np.load(self.directory / _shard_name(number), mmap_mode="r")
        return self._shards[number]

    def __getitem__(self, image_id: str) -> np.ndarray:
        shard, row = self._rows[str(image_id)]
        return self._shard(shard)[row]

    def __contains__(self, image_id: object) -> bool:
        return str(image_id) in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def load_vision_encoder(name_or_path: str):
    """Load (CLIP vision encoder, image processor) from a SmallCap checkpoint, a CLIP checkpoint or a Hub id."""
    name_or_path = resolve_pretrained(name_or_path, "encoder")
    processor = load_image_processor(name_or_path)
    with explain_load_errors(name_or_path, "encoder"):
        config = AutoConfig.from_pretrained(name_or_path)
        if config.model_type == "smallcap":
            encoder = load_smallcap(name_or_path).encoder
        else:
            encoder = CLIPVisionModel.from_pretrained(name_or_path)
    return encoder.eval(), processor


def extract_features(images: Iterable[tuple[str, str | os.PathLike]], encoder, out_dir: str | os.PathLike,
                     processor=None, fp16: bool = False, batch_size: int = 64, shard_size: int = 1024,
                     device: str | torch.device | None = None, num_workers: int = 0,
                     progress: bool = True) -> ExtractionReport:
    """Encode (image id, image path) pairs into the cache at `out_dir`, continuing an interrupted extraction.

    `encoder` is a `CLIPVisionModel`, a `SmallCap` (its encoder is used) or a name/path for
    `load_vision_encoder`; `processor` is the CLIP image processor (required unless `encoder` is a name).
    With `fp16` the states are stored as float16 (half the disk) and, on a GPU, computed under fp16 autocast.
    Images that exist but cannot be decoded are skipped and reported; missing files are an error up front.
    """
    name = encoder if isinstance(encoder, str) else None
    if isinstance(encoder, str):
        encoder, loaded_processor = load_vision_encoder(encoder)
        processor = processor or loaded_processor
    if hasattr(encoder, "decoder"):  # a SmallCap model -> its CLIP vision tower
        encoder = encoder.encoder
    if processor is None:
        raise SmallCapError("extract_features needs the CLIP image processor of the encoder")
    images = _check_images(images)
    out_dir = Path(out_dir)
    info = EncoderInfo.of(encoder, name)
    dtype = "float16" if fp16 else "float32"
    cache = _open_for_writing(out_dir, info, dtype)
    report = ExtractionReport(skipped=dict(cache.skipped))
    todo = [(i, p) for i, p in images if i not in cache and i not in cache.skipped]
    report.cached = len(images) - len(todo)
    if not todo:
        return report

    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder = encoder.to(device).eval()
    autocast = (torch.autocast(device.type, dtype=torch.float16) if fp16 and device.type == "cuda"
                else contextlib.nullcontext())
    # Its own generator: extracting must not draw from the global RNG (training's dropout stream).
    loader = torch.utils.data.DataLoader(_ImageFiles(todo, processor), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=list, generator=torch.Generator())
    rows = dict(cache._rows)
    shard_number, pending_ids, pending = cache.num_shards, [], []
    bar = tqdm(total=len(todo), desc="encoding images", unit="img", disable=not progress, file=sys.stderr)
    for batch in loader:
        good = [(i, px) for i, px, error in batch if error is None]
        for image_id, _, error in batch:
            if error is not None:
                report.skipped[image_id] = error
                print(f"smallcap: skipping image {image_id}: {error}", file=sys.stderr)
        if good:
            pixels = torch.stack([px for _, px in good]).to(device)
            with torch.inference_mode(), autocast:
                states = encoder(pixel_values=pixels).last_hidden_state
            pending.append(states.float().cpu().numpy().astype(dtype))
            pending_ids.extend(i for i, _ in good)
        if len(pending_ids) >= shard_size:
            _write_shard(out_dir, shard_number, pending_ids, pending, rows, report.skipped)
            report.encoded += len(pending_ids)
            shard_number, pending_ids, pending = shard_number + 1, [], []
        bar.update(len(batch))
    bar.close()
    if pending_ids or report.skipped != cache.skipped:
        _write_shard(out_dir, shard_number, pending_ids, pending, rows, report.skipped)
        report.encoded += len(pending_ids)
    return report


def _check_images(images: Iterable[tuple[str, str | os.PathLike]]) -> list[tuple[str, Path]]:
    pairs, paths = [], {}
    for image_id, path in images:
        image_id, path = str(image_id), Path(path)
        if paths.setdefault(image_id, path) != path:
            raise SmallCapError(f"image id {image_id} names two files: {paths[image_id]} and {path}")
        if len(paths) > len(pairs):
            pairs.append((image_id, path))
    missing = [str(p) for _, p in pairs if not p.is_file()]
    if missing:
        raise SmallCapError(f"{len(missing)} of {len(pairs)} image files do not exist, e.g. {', '.join(missing[:3])}"
                            " (check --images, the image root directory)")
    return pairs


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item; a broken file gives its error message instead of pixels."""

    def __init__(self, items: list[tuple[str, Path]], processor):
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        image_id, path = self.items[index]
        try:
            with Image.open(path) as image:
                pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        except Exception as error:  # any decoding failure: skip this image, keep the rest
            return image_id, None, f"cannot read {path}: {type(error).__name__}: {error}"
        return image_id, pixels, None


def _open_for_writing(out_dir: Path, info: EncoderInfo, dtype: str) -> FeatureCache:
    """Create the manifest of a new cache, or check that an existing cache matches this extraction."""
    if (out_dir / MANIFEST).exists():
        cache = FeatureCache(out_dir)
        cache.check_encoder(info)
        if cache.manifest["dtype"] != dtype:
            raise SmallCapError(f"the feature cache {out_dir} stores {cache.manifest['dtype']}; this extraction asks for "
                                f"{dtype} ({'drop' if dtype == 'float16' else 'add'} --fp16, or use another directory)")
        return cache
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SmallCapError(f"{out_dir} exists and is not a feature cache; choose an empty or new directory")
    atomic_write_json(out_dir / MANIFEST, {"format": FORMAT_VERSION, "encoder": vars(info), "dtype": dtype,
                                           "states": "last_hidden_state"})
    return FeatureCache(out_dir)


def _write_shard(out_dir: Path, number: int, ids: list[str], arrays: list[np.ndarray],
                 rows: dict[str, tuple[int, int]], skipped: dict[str, str]) -> None:
    """Write one shard atomically, then commit it (and the skipped images) to the index."""
    if ids:
        path = out_dir / _shard_name(number)
        with atomic_open(path) as handle:
            np.save(handle, np.concatenate(arrays))
        rows.update({image_id: (number, row) for row, image_id in enumerate(ids)})
    num_shards = number + 1 if ids else number
    atomic_write_json(out_dir / INDEX, {"num_shards": num_shards, "rows": rows, "skipped": skipped}, indent=None)


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.npy"


def extract_dataset_features(data: str | os.PathLike, model: str, out_dir: str | os.PathLike,
                             images: str | os.PathLike | None = None, split: str | None = None, fp16: bool = False,
                             batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                             progress: bool = True) -> ExtractionReport:
    """Encode every image of a caption file's split (see `read_training_samples`) into the cache at `out_dir`."""
    samples = read_training_samples(data, images, split)
    no_file = sorted({s.image_id for s in samples if s.image_path is None})
    if no_file:
        raise SmallCapError(f"{data}: {len(no_file)} images have no file name, e.g. {', '.join(no_file[:5])}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = sorted({(s.image_id, str(s.image_path)) for s in samples})
    return extract_features(pairs, model, out_dir, fp16=fp16, batch_size=batch_size, num_workers=num_workers,
                            device=device, progress=progress)
