"""Batched, retrieval-augmented decoding: prompts of different lengths in one `generate` call.

Prompts are left-padded; the attention mask hides the padding and position ids restart at each row's first
real token, so a batched row decodes exactly as it would alone. Beam search on GPT-2-family decoders runs as
continuous batching (`smallcap.beam_batching`); other decoders and settings go through transformers' `generate`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput

from smallcap.beam_batching import continuous_beam_search, supports_continuous_batching
from smallcap.modeling import END_TOKEN_ID, SmallCap
from smallcap.prompt import left_pad


@dataclass
class GenerationSettings:
    """Decoding settings; the defaults are SmallCap's (beam 3, 25 new tokens, plain sum of log-probs)."""

    num_beams: int = 3
    max_new_tokens: int = 25
    length_penalty: float = 0.0
    early_stopping: bool = True
    no_repeat_ngram_size: int = 0
    do_sample: bool = False

    def check(self) -> None:
        """Raise SmallCapError for settings `generate` cannot run with (beams or new tokens below 1)."""
        from smallcap.errors import SmallCapError

        for name in ("num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise SmallCapError(f"{name} must be at least 1, got {getattr(self, name)}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `model.generate`."""
        kwargs = asdict(self)
        if self.num_beams == 1:  # beam-only options would only produce warnings
            kwargs.pop("length_penalty"), kwargs.pop("early_stopping")
        return kwargs


def new_tokens(output_ids: torch.Tensor, prompt_width: int, end_token_id: int = END_TOKEN_ID) -> list[list[int]]:
    """The generated ids of each row, up to and including its first end token.

    (transformers 5.x pads finished beams with the end token rather than the pad token; cutting at the first
    end token removes that difference.)
    """
    rows = []
    for row in output_ids[:, prompt_width:].tolist():
        rows.append(row[:row.index(end_token_id) + 1] if end_token_id in row else row)
    return rows


@torch.inference_mode()
def generate(model: SmallCap, prompts: Sequence[Sequence[int]], *, pixel_values: torch.Tensor | None = None,
             encoder_hidden_states: torch.Tensor | None = None, settings: GenerationSettings | None = None,
             max_in_flight: int | None = None) -> list[list[int]]:
    """Continue each prompt conditioned on its image; returns the new token ids per image (end token kept).

    Give either `pixel_values` (n, 3, H, W) or precomputed `encoder_hidden_states` (n, tokens, width).
    Beam search with early stopping on GPT-2-family decoders runs as continuous batching: `max_in_flight` images
    (default: all) decode at a time, a finished image's rows leave the batch and the next image takes its place
    (`smallcap.beam_batching`). Everything else runs `generate_with_transformers`. Both give the same tokens.
    """
    if (pixel_values is None) == (encoder_hidden_states is None):
        raise ValueError("pass exactly one of pixel_values and encoder_hidden_states")
    settings = settings or GenerationSettings()
    if encoder_hidden_states is None:
        encoder_hidden_states = model.encoder(pixel_values=pixel_values.to(model.device, model.dtype)).last_hidden_state
    if supports_continuous_batching(model, settings):
        return continuous_beam_search(model, prompts, encoder_hidden_states, settings, max_in_flight)
    return generate_with_transformers(model, prompts, encoder_hidden_states, settings)


@torch.inference_mode()
def generate_with_transformers(model: SmallCap, prompts: Sequence[Sequence[int]], encoder_hidden_states: torch.Tensor,
                               settings: GenerationSettings | None = None) -> list[list[int]]:
    """`generate` through transformers' `model.generate`, all prompts in one left-padded batch run to its longest
    row: for OPT/XGLM decoders, sampling, n-gram blocking and `early_stopping` other than True.

    The prompt is run through the decoder once per image and its cache copied to every beam (plain beam
    search would run it once per beam); only the last position's logits are computed. Both are exact.
    """
    settings = settings or GenerationSettings()
    device = model.device
    encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden_states.to(device, model.dtype))
    input_ids, attention_mask, position_ids = (t.to(device) for t in left_pad(prompts, model.config.pad_token_id))
    prompt_cache = {}
    if input_ids.shape[1] > 1:
        prefix = model(encoder_outputs=encoder_outputs, decoder_input_ids=input_ids[:, :-1],
                       decoder_attention_mask=attention_mask[:, :-1], decoder_position_ids=position_ids[:, :-1],
                       decoder_logits_to_keep=1, use_cache=True)
        prefix.cache.batch_repeat_interleave(settings.num_beams)
        prompt_cache["cache"] = prefix.cache
    output = model.generate(
        encoder_outputs=encoder_outputs,
        decoder_input_ids=input_ids,
        decoder_attention_mask=attention_mask,
        decoder_position_ids=position_ids,
        decoder_logits_to_keep=1,
        pad_token_id=model.config.pad_token_id,
        eos_token_id=model.config.eos_token_id,
        **prompt_cache,
        **settings.generate_kwargs(),
    )
    return new_tokens(output.cpu(), input_ids.shape[1], model.config.eos_token_id)
