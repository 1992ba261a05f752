"""The open_clip retrieval backend: `open_clip:ARCH[/PRETRAINED]`, e.g. `open_clip:RN50x64/openai`.

This is how SmallCap's reference datastores were embedded (OpenAI CLIP RN50x64). open_clip is an optional
extra (`pip install 'smallcap[open-clip]'`, which also brings torchvision), imported only when used.
PRETRAINED is an open_clip weights tag (default `openai`) or a local weights file.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from smallcap.errors import SmallCapError, require_extra
from smallcap.retrieval.encoders import batches, normalise

DEFAULT_TAG = "openai"


def parse_open_clip_name(name: str) -> tuple[str, str]:
    """Split `open_clip:ARCH[/PRETRAINED]` into (ARCH, PRETRAINED); PRETRAINED defaults to `openai`."""
    spec = name.removeprefix("open_clip:")
    arch, _, pretrained = spec.partition("/")
    if not arch:
        raise SmallCapError(f"encoder name {name!r}: expected open_clip:ARCH[/PRETRAINED], "
                            "e.g. open_clip:RN50x64/openai")
    return arch, pretrained or DEFAULT_TAG


class OpenCLIPEncoder:
    """An open_clip CLIP model used as a retrieval encoder (same interface as HFCLIPEncoder)."""

    def __init__(self, model, preprocess, tokenizer, name: str, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.device = torch.device(device)
        self.dim = int(self.embed_texts(["a photo"]).shape[1])

    @classmethod
    def from_name(cls, name: str, device: str = "cpu") -> "OpenCLIPEncoder":
        """Create model, preprocessing and tokenizer for `open_clip:ARCH[/PRETRAINED]`."""
        arch, pretrained = parse_open_clip_name(name)
        open_clip = require_extra("open_clip", "open-clip", "An open_clip retrieval encoder")
        if arch not in open_clip.list_models():
            raise SmallCapError(f"open_clip has no model {arch!r}; see open_clip.list_models() "
                                "(e.g. RN50x64, ViT-B-32)")
        # OpenAI's weights were trained with QuickGELU; open_clip only warns if the architecture disagrees.
        quick_gelu = bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
        except (RuntimeError, OSError, ValueError) as error:
            raise SmallCapError(
                f"could not load open_clip model {arch} with weights {pretrained!r}: {str(error).splitlines()[0]}. "
                f"Without network access, pass a local weights file: open_clip:{arch}//path/to/weights.pt") from None
        return cls(model, preprocess, open_clip.get_tokenizer(arch), name=f"open_clip:{arch}/{pretrained}",
                   device=device)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed PIL images; returns (n, dim) float32 unit vectors."""
        out = []
        for batch in batches(list(images), batch_size, progress, "embedding images"):
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in batch]).to(self.device)
            out.append(normalise(self.model.encode_image(pixels)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embed caption strings (truncated to the model's context); returns (n, dim) float32 unit vectors."""
        out = []
        for batch in batches(list(texts), batch_size, progress, "embedding texts"):
            out.append(normalise(self.model.encode_text(self.tokenizer(list(batch)).to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
