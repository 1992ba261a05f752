"""The SmallCap model: a frozen CLIP vision tower, a frozen decoder LM, and small reduced cross-attention layers.

Built on transformers' `VisionEncoderDecoderModel` and `GPT2LMHeadModel`, subclassed only where SmallCap
differs: the cross-attention's inner width is `hidden / r` and its key/value input is the *encoder* width,
the prompt is the decoder start (no start token is prepended), and reference checkpoints load unchanged.
The OPT and XGLM decoders are in `smallcap.decoders`; `decoder_class` picks one from the decoder config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    CLIPConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.models.gpt2.modeling_gpt2 import Conv1D, GPT2Attention

from smallcap.decoders import CrossAttentionConfig, family_of, supported_families
from smallcap.decoders.opt import SmallCapOPTConfig, SmallCapOPTDecoder
from smallcap.decoders.xglm import SmallCapXGLMConfig, SmallCapXGLMDecoder
from smallcap.errors import SmallCapError
from smallcap.hub import explain_load_errors, resolve_pretrained

PAD_TOKEN_ID = 0  # "!"
END_TOKEN_ID = 13  # "."
REDUCE_FACTORS = (1, 2, 4, 8, 16)

# Persistent buffers that transformers 4.x wrote into checkpoints and 5.x no longer has.
_OBSOLETE_BUFFER_SUFFIXES = (
    ".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias",
)
_OBSOLETE_BUFFER_KEYS = ("encoder.embeddings.position_ids", "decoder.model.embed_positions.weights")


class SmallCapDecoderConfig(CrossAttentionConfig, GPT2Config):
    """GPT-2 config plus the reduce factor and encoder width of SmallCap's cross-attention.

    `model_type` is "this_gpt2", the name reference checkpoints use.
    """

    model_type = "this_gpt2"


class ReducedCrossAttention(GPT2Attention):
    """GPT-2 cross-attention with inner width `hidden / r` and key/value computed from the encoder width.

    Keeps all heads, so the head width is `hidden / (r * heads)` and scores are scaled by its inverse square
    root. GPT-2's attention forward is reused unchanged; only the projections and sizes differ.
    """

    def __init__(self, config: SmallCapDecoderConfig, layer_idx: int | None = None):
        super().__init__(config, is_cross_attention=True, layer_idx=layer_idx)
        r = config.cross_attention_reduce_factor
        if self.embed_dim % (r * self.num_heads):
            raise ValueError(f"hidden size {self.embed_dim} is not divisible by reduce factor {r} x {self.num_heads} heads")
        inner = self.embed_dim // r
        self.split_size = inner
        self.head_dim = inner // self.num_heads
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.q_attn = Conv1D(inner, self.embed_dim)
        self.c_attn = Conv1D(2 * inner, config.encoder_hidden_size)
        self.c_proj = Conv1D(self.embed_dim, inner)


class SmallCapDecoder(GPT2LMHeadModel):
    """GPT-2 language model whose blocks cross-attend to the image through `ReducedCrossAttention`."""

    config_class = SmallCapDecoderConfig
    cross_attention_marker = "crossattention"  # the reference trains every parameter whose name contains this

    def __init__(self, config: SmallCapDecoderConfig):
        super().__init__(config)
        for index, block in enumerate(self.transformer.h):
            block.crossattention = ReducedCrossAttention(config, layer_idx=index)
        self.post_init()


DECODER_CLASSES = {"this_gpt2": SmallCapDecoder, "this_opt": SmallCapOPTDecoder, "this_xglm": SmallCapXGLMDecoder}
DECODER_CONFIGS = {"this_gpt2": SmallCapDecoderConfig, "this_opt": SmallCapOPTConfig, "this_xglm": SmallCapXGLMConfig}


def decoder_class(config) -> type:
    """The SmallCap decoder class for a decoder config (or its dict), chosen by its `model_type`."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in DECODER_CLASSES:
        raise SmallCapError(f"unsupported SmallCap decoder {model_type!r}; supported families: {supported_families()}")
    return DECODER_CLASSES[model_type]


class SmallCapConfig(VisionEncoderDecoderConfig):
    """Top-level SmallCap config: a CLIP vision config, a `this_gpt2`/`this_opt`/`this_xglm` decoder config and
    prompt settings.

    Reference checkpoints store the *full* CLIP config as the encoder; only its vision part is kept.
    """

    model_type = "smallcap"
    sub_configs_defaults = {
        "decoder": SubConfigSpec(config_class=AutoConfig, model_type="this_gpt2"),
        "encoder": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }
    k: int = 4
    rag: bool = True
    retrieval_encoder: str | None = None

    def __post_init__(self, **kwargs):
        if self.decoder is not None:
            decoder_class(self.decoder)  # an unsupported family fails here, not with transformers' list of all types
        if isinstance(self.encoder, dict) and self.encoder.get("model_type") == "clip":
            self.encoder = CLIPConfig(**self.encoder).vision_config
        elif isinstance(self.encoder, CLIPConfig):
            self.encoder = self.encoder.vision_config
        kwargs.setdefault("pad_token_id", PAD_TOKEN_ID)
        kwargs.setdefault("eos_token_id", END_TOKEN_ID)
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = False
        # The cross-attention reads encoder states directly: no projection between encoder and decoder.
        self.decoder.cross_attention_hidden_size = self.encoder.hidden_size
        self.decoder.encoder_hidden_size = self.encoder.hidden_size


class SmallCap(VisionEncoderDecoderModel):
    """SmallCap: image -> CLIP vision states (before post-layernorm) -> decoder LM with reduced cross-attention.

    Only the cross-attention is trainable (see `freeze_for_training`).
    """

    config_class = SmallCapConfig
    base_model_prefix = "smallcap"

    def __init__(self, config: SmallCapConfig, encoder=None, decoder=None):
        if encoder is None:
            encoder = CLIPVisionModel(config.encoder)
        if decoder is None:
            decoder = decoder_class(config.decoder)(config.decoder)
        super().__init__(config=config, encoder=encoder, decoder=decoder)
        self.freeze_for_training()

    @classmethod
    def from_encoder_decoder_pretrained(cls, encoder_name_or_path: str, decoder_name_or_path: str,
                                        cross_attention_reduce_factor: int = 4, **kwargs) -> "SmallCap":
        """Build a new SmallCap from a pretrained CLIP (full or vision-only) and a GPT-2, OPT or XGLM decoder.

        The family comes from the decoder's config (`model_type`), never from its name. The cross-attention
        layers are new (randomly initialised); everything else is the pretrained weights.
        """
        if cross_attention_reduce_factor not in REDUCE_FACTORS:
            raise SmallCapError(f"reduce factor must be one of {REDUCE_FACTORS}, got {cross_attention_reduce_factor}")
        encoder_name_or_path = resolve_pretrained(encoder_name_or_path, "encoder")
        decoder_name_or_path = resolve_pretrained(decoder_name_or_path, "decoder")
        with explain_load_errors(encoder_name_or_path, "encoder"):
            encoder = CLIPVisionModel.from_pretrained(encoder_name_or_path)
        with explain_load_errors(decoder_name_or_path, "decoder"):
            base = AutoConfig.from_pretrained(decoder_name_or_path)
            family = family_of(base.model_type)
            if family is None:
                raise SmallCapError(f"decoder {decoder_name_or_path!r} is a {base.model_type!r} model; "
                                    f"supported families: {supported_families()}")
            decoder_config = DECODER_CONFIGS[family](
                **{k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures")},
                cross_attention_reduce_factor=cross_attention_reduce_factor,
                encoder_hidden_size=encoder.config.hidden_size,
            )
            decoder = DECODER_CLASSES[family].from_pretrained(decoder_name_or_path, config=decoder_config)
        config = SmallCapConfig(encoder=encoder.config.to_dict(), decoder=decoder.config.to_dict(), **kwargs)
        return cls(config, encoder=encoder, decoder=decoder)

    def freeze_for_training(self, train_decoder: bool = False) -> None:
        """Freeze everything but the cross-attention (the reference's substring rule, per decoder family).

        GPT-2's `ln_cross_attn` stays frozen at its initial value, while OPT's and XGLM's
        `encoder_attn_layer_norm` is trained, as in the reference. With `train_decoder` the whole decoder is
        trainable (the encoder stays frozen).
        """
        marker = self.decoder.cross_attention_marker
        for name, parameter in self.named_parameters():
            in_decoder = name.startswith("decoder.")
            parameter.requires_grad = in_decoder and (train_decoder or marker in name)

    def num_trainable_parameters(self) -> int:
        """Number of parameters that receive gradients."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _prepare_decoder_input_ids_for_generation(self, batch_size, model_input_name, model_kwargs,
                                                  decoder_start_token_id, device=None):
        # The prompt is the decoder start: transformers 5.x would otherwise prepend a start token and shift it.
        if model_kwargs is not None and "decoder_input_ids" in model_kwargs:
            return model_kwargs.pop("decoder_input_ids"), model_kwargs
        return super()._prepare_decoder_input_ids_for_generation(
            batch_size, model_input_name, model_kwargs, decoder_start_token_id, device)


for _model_type, _config_class in DECODER_CONFIGS.items():
    AutoConfig.register(_model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, DECODER_CLASSES[_model_type], exist_ok=True)
AutoConfig.register("smallcap", SmallCapConfig, exist_ok=True)
AutoModel.register(SmallCapConfig, SmallCap, exist_ok=True)
# No `register_for_auto_class`: it would copy this file into every checkpoint as remote code, and that copy
# cannot run without the smallcap package, whose import registers the classes above anyway.


def _read_reference_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Read an old-format `pytorch_model.bin` safely (tensors only, never code) and drop obsolete buffers."""
    state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items()
            if not key.endswith(_OBSOLETE_BUFFER_SUFFIXES) and key not in _OBSOLETE_BUFFER_KEYS}


def load_smallcap(name_or_path: str | os.PathLike, **kwargs) -> SmallCap:
    """Load a SmallCap checkpoint: current format (safetensors) or the reference's `pytorch_model.bin`.

    Reference checkpoints are read with `weights_only=True`; their obsolete buffers are ignored and any other
    missing or unexpected key is an error.
    """
    name = resolve_pretrained(str(name_or_path), "SmallCap model")
    directory = Path(name)
    if directory.is_dir() and not any((directory / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        if not (directory / "config.json").exists():
            raise SmallCapError(f"{directory} has no config.json: not a SmallCap checkpoint directory")
        if not (directory / "pytorch_model.bin").exists():
            raise SmallCapError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
        return _load_reference_checkpoint(directory, **kwargs)
    with explain_load_errors(name, "SmallCap model"):
        config = SmallCapConfig.from_pretrained(name)
        _check_is_smallcap(config, name)
        try:
            model = SmallCap.from_pretrained(name, config=config, **kwargs)
        except SafetensorError as error:
            weights = directory / "model.safetensors" if directory.is_dir() else f"{name}'s model.safetensors"
            raise SmallCapError(f"{weights} is damaged or incomplete ({str(error).splitlines()[0]}); download or "
                                "copy the checkpoint again") from None
    model.freeze_for_training()  # loading replaces parameters, which resets requires_grad
    return model.eval()


def _check_is_smallcap(config, name: str) -> None:
    if getattr(config, "model_type", None) != "smallcap":
        raise SmallCapError(f"{name!r} is a {config.model_type!r} checkpoint, not a SmallCap model")


def _load_reference_checkpoint(directory: Path, **kwargs) -> SmallCap:
    with open(directory / "config.json", encoding="utf-8") as handle:
        raw = json.load(handle)
    if raw.get("model_type") != "smallcap":
        raise SmallCapError(f"{directory / 'config.json'} has model_type {raw.get('model_type')!r}, expected 'smallcap'")
    try:
        config = SmallCapConfig.from_dict(raw)
        state = _read_reference_state_dict(directory)
    except Exception as error:  # a corrupt or foreign file: say which one
        raise SmallCapError(f"cannot read the checkpoint in {directory}: {error}") from error
    dtype = kwargs.pop("dtype", None)
    model = SmallCap(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - {"decoder.lm_head.weight"})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise SmallCapError(f"{directory / 'pytorch_model.bin'} does not match the SmallCap architecture of its "
                            f"config: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
