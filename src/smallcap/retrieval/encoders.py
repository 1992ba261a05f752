"""Retrieval encoders: one small interface to embed images and texts into a shared, L2-normalised space.

The Hugging Face CLIP backend is built in; other backends (open_clip) plug in behind the same interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from smallcap.hub import bundled_name, explain_load_errors, resolve_pretrained

DEFAULT_RETRIEVAL_ENCODER = "openai/clip-vit-base-patch32"


class RetrievalEncoder(Protocol):
    """What a datastore needs from an encoder: a name, a dimension and L2-normalised float32 embeddings."""

    name: str
    dim: int

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray: ...


def normalise(features: torch.Tensor) -> np.ndarray:
    """L2-normalised float32 numpy embeddings (cosine similarity = inner product in the faiss index)."""
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy().astype(np.float32)


def batches(items: Sequence, batch_size: int, progress: bool, desc: str):
    """`items` in slices of `batch_size`, with a progress bar when there are several."""
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2):
        yield items[start:start + batch_size]


class HFCLIPEncoder:
    """A Hugging Face `CLIPModel` (Hub id or local path) used as a retrieval encoder."""

    def __init__(self, model, processor, tokenizer, name: str, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.processor = processor
        self.tokenizer = tokenizer
        self.name = name
        self.dim = int(model.config.projection_dim)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_RETRIEVAL_ENCODER, device: str = "cpu") -> "HFCLIPEncoder":
        """Load model, image processor and tokenizer from one checkpoint directory or Hub id."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = resolve_pretrained(name_or_path, what="retrieval encoder")  # a bundled short name keeps its name
        with explain_load_errors(name_or_path, "retrieval encoder"):
            model = CLIPModel.from_pretrained(path)
            processor = AutoImageProcessor.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, processor, tokenizer, name=str(name_or_path), device=device)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed PIL images; returns (n, dim) float32 unit vectors."""
        out = [np.zeros((0, self.dim), np.float32)]
        for batch in batches(list(images), batch_size, progress, "embedding images"):
            pixels = self.processor(images=[im.convert("RGB") for im in batch], return_tensors="pt").pixel_values
            out.append(self.image_embeddings_from_pixels(pixels.to(self.device)))
        return np.concatenate(out)

    def image_embeddings_from_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Embed preprocessed pixels; returns (n, dim) float32 unit vectors."""
        with torch.inference_mode():
            return normalise(self.model.get_image_features(pixel_values=pixel_values).pooler_output)

    def image_embeddings_from_states(self, last_hidden_state: torch.Tensor) -> np.ndarray:
        """Embed from this CLIP's own vision states (CLS -> post-layernorm -> projection), no second pass."""
        with torch.inference_mode():
            states = last_hidden_state.to(self.device, self.model.dtype)
            pooled = self.model.vision_model.post_layernorm(states[:, 0, :])
            return normalise(self.model.visual_projection(pooled))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embed caption strings (truncated to CLIP's context); returns (n, dim) float32 unit vectors."""
        out = [np.zeros((0, self.dim), np.float32)]
        for batch in batches(list(texts), batch_size, progress, "embedding texts"):
            tokens = self.tokenizer(list(batch), padding=True, truncation=True, return_tensors="pt").to(self.device)
            out.append(normalise(self.model.get_text_features(**tokens).pooler_output))
        return np.concatenate(out)


def canonical_encoder_name(name: str) -> str:
    """The form of an encoder name that datastores record and compare.

    A local path becomes absolute, except the bundled encoder's directory, which becomes its short name
    (`mini-clip`) so that bundled datastores work from any install path; `open_clip:ARCH` gains the default
    `/openai` weights tag; Hub ids and other names are unchanged.
    """
    if name.startswith("open_clip:"):
        from smallcap.retrieval.open_clip_encoder import parse_open_clip_name

        return "open_clip:{}/{}".format(*parse_open_clip_name(name))
    path = Path(name).expanduser()
    if path.exists():
        return bundled_name(path) or str(path.resolve())
    return name


def load_encoder(name: str = DEFAULT_RETRIEVAL_ENCODER, device: str = "cpu") -> RetrievalEncoder:
    """Resolve an encoder name: `open_clip:ARCH[/PRETRAINED]` for open_clip, anything else a HF CLIP id or path."""
    if name.startswith("open_clip:"):
        from smallcap.retrieval.open_clip_encoder import OpenCLIPEncoder

        return OpenCLIPEncoder.from_name(name, device=device)
    return HFCLIPEncoder.from_pretrained(name, device=device)
