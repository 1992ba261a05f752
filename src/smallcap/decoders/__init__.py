"""Decoder families SmallCap supports beyond GPT-2 (which lives in `smallcap.modeling`): OPT and XGLM.

`FAMILIES` describes each family by the `model_type` its SmallCap decoder config carries; the model classes
are chosen from it in `smallcap.modeling.decoder_class`, never from a model's name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, repr=False, eq=False)
class CrossAttentionConfig:
    """What every SmallCap decoder config adds to its language model's config (mixed in before it, e.g.
    `class SmallCapOPTConfig(CrossAttentionConfig, OPTConfig)`): the reduce factor r and the encoder width of
    the cross-attention, and a decoder that always cross-attends to the image."""

    cross_attention_reduce_factor: int = 1
    encoder_hidden_size: int = 768

    def __post_init__(self, **kwargs):
        kwargs.setdefault("is_decoder", True)
        # Set on the object, not as a kwarg: GPT2Config and XGLMConfig declare it as a field (default False).
        self.add_cross_attention = True
        super().__post_init__(**kwargs)


@dataclass(frozen=True)
class DecoderFamily:
    """What differs between decoder families outside the model code."""

    name: str
    base_model_types: tuple[str, ...]  # `model_type` of the plain language models it is built from
    default_tokenizer: str  # used when a checkpoint carries no tokenizer
    prompt_starts_with_eos: bool  # the reference's prompts start with "</s>" (OPT's BOS, XGLM's post-processor)


FAMILIES: dict[str, DecoderFamily] = {
    "this_gpt2": DecoderFamily("GPT-2", ("gpt2",), "gpt2", False),
    "this_opt": DecoderFamily("OPT", ("opt",), "facebook/opt-125m", True),
    "this_xglm": DecoderFamily("XGLM", ("xglm",), "facebook/xglm-564M", True),
}


def supported_families() -> str:
    """One line naming the supported families, for error messages."""
    return ", ".join(f"{family.name} ({'/'.join(family.base_model_types)})" for family in FAMILIES.values())


def family_of(model_type: str | None) -> str | None:
    """The SmallCap decoder `model_type` for a decoder or plain language-model `model_type` (None if unsupported)."""
    for decoder_type, family in FAMILIES.items():
        if model_type == decoder_type or model_type in family.base_model_types:
            return decoder_type
    return None
