"""Loading a captioner: a name or directory -> (SmallCap model, tokenizer, image processor).

Like open_clip's `create_model_and_transforms`, one call returns the parts that must match. A name is a local
directory, a bundled short name (`mini`) or a Hub id (`smallcap.hub.resolve_pretrained` decides which). A
checkpoint's own tokenizer and image-processor files are used when it has them; a checkpoint without them (the
published SmallCap checkpoints) gets those of the base models it was built from. A part that fails to load is an
error naming it: nothing falls back silently to another tokenizer or processor.
"""

from __future__ import annotations

import os
from pathlib import Path

from smallcap.decoders import FAMILIES
from smallcap.hub import explain_load_errors, local_snapshot, looks_like_path, resolve_pretrained
from smallcap.modeling import SmallCap, load_smallcap
from smallcap.prompt import load_tokenizer

# The base models of the published SmallCap checkpoints, for checkpoints that do not name theirs (the decoder's
# tokenizer is its family's default, `smallcap.decoders.FAMILIES`).
DEFAULT_DECODER = FAMILIES["this_gpt2"].default_tokenizer
DEFAULT_ENCODER = "openai/clip-vit-base-patch32"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)


def load_image_processor(name_or_path: str | os.PathLike):
    """The image processor of a checkpoint directory, bundled short name or Hub id."""
    from transformers import AutoImageProcessor

    name = resolve_pretrained(str(name_or_path), "image processor")
    with explain_load_errors(name, "image processor"):
        return AutoImageProcessor.from_pretrained(name)


def base_model_name(sub_config, default: str) -> str:
    """The name a SmallCap config records for its encoder or decoder, when it still names something loadable
    (an existing directory or a Hub id), else `default` (the published checkpoints' base model)."""
    name = str(getattr(sub_config, "_name_or_path", "") or "")
    return name if name and (Path(name).is_dir() or not looks_like_path(name)) else default


def _has_any(directory: str, files: tuple[str, ...]) -> bool:
    return any((Path(directory) / file).is_file() for file in files)


def load_captioner_parts(name_or_path: str | os.PathLike, *, tokenizer: str | None = None,
                         image_processor: str | None = None, **model_kwargs) -> tuple[SmallCap, object, object]:
    """(model, tokenizer, image processor) of a SmallCap checkpoint (directory, short name or Hub id).

    `tokenizer` / `image_processor` name other ones to use; otherwise the checkpoint's own, or its base models'
    when it has none. `model_kwargs` go to `load_smallcap` (e.g. `dtype`).
    """
    directory = local_snapshot(str(name_or_path))
    model = load_smallcap(directory, **model_kwargs)
    decoder_type = model.config.decoder.model_type
    if tokenizer is None:
        tokenizer = directory if _has_any(directory, TOKENIZER_FILES) else base_model_name(
            model.config.decoder, FAMILIES[decoder_type].default_tokenizer)
    if image_processor is None:
        image_processor = directory if _has_any(directory, IMAGE_PROCESSOR_FILES) else base_model_name(
            model.config.encoder, DEFAULT_ENCODER)
    return model, load_tokenizer(str(tokenizer), decoder_type), load_image_processor(image_processor)
