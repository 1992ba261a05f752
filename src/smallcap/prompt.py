"""SmallCap's prompt and token conventions: template, retrieved captions, training labels, clean captions.

Prompt and caption are encoded *separately* (the prompt ends with a lone space token, the caption starts
with an unspaced word); re-encoding the joined string gives other ids and breaks published checkpoints.
OPT and XGLM prompts start with "</s>" as the reference's tokenizers add it; GPT-2 prompts have no start token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, GPT2Tokenizer

from smallcap.decoders import FAMILIES
from smallcap.hub import bundled_path, explain_load_errors, resolve_pretrained
from smallcap.modeling import END_TOKEN_ID, PAD_TOKEN_ID

TEMPLATE = "Similar images show\n\n||\n\nThis image shows "
NO_RETRIEVAL_PROMPT = "This image shows "
CAPTION_SEPARATOR = "\n\n"
MAX_CAPTION_TOKENS = 25
IGNORE_INDEX = -100


def load_tokenizer(name_or_path: str, decoder_type: str = "this_gpt2"):
    """Load the tokenizer of a decoder family and set SmallCap's pad `!` and end `.` tokens.

    `decoder_type` is the SmallCap decoder's `model_type` ("this_gpt2", "this_opt", "this_xglm"): it decides
    whether prompts start with "</s>" (see `prompt_ids`).
    """
    name_or_path = str(bundled_path(name_or_path) or name_or_path)
    if not Path(name_or_path).expanduser().is_dir():
        name_or_path = resolve_pretrained(name_or_path, "tokenizer")
    # An XGLM tokenizer saved with eos '.' would rebuild its post-processor as ". $A": load it with its own eos.
    options = {"eos_token": "</s>"} if decoder_type == "this_xglm" else {}
    with explain_load_errors(name_or_path, "tokenizer"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **options)
        except ValueError:  # bare vocab.json + merges.txt without a tokenizer config
            tokenizer = GPT2Tokenizer.from_pretrained(name_or_path)
    start = "</s>" if FAMILIES[decoder_type].prompt_starts_with_eos else None
    tokenizer.pad_token = "!"
    tokenizer.eos_token = "."
    _encode_pad_and_end_as_plain_text(tokenizer)
    tokenizer.smallcap_prompt_start = None if start is None else tokenizer.convert_tokens_to_ids(start)
    return tokenizer


def _encode_pad_and_end_as_plain_text(tokenizer) -> None:
    # transformers 5 registers special tokens with the backend as "added tokens", which are split out of the
    # text before BPE: "a bike.." would encode as [.., 13, 13] instead of the reference's [.., 492]. In SmallCap
    # `!` and `.` are ordinary vocabulary entries that merely serve as pad and end, so unregister them.


    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kept = [token for token in spec.get("added_tokens", []) if token["content"] not in ("!", ".")]
    if len(kept) != len(spec.get("added_tokens", [])):
        spec["added_tokens"] = kept
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))


def build_prompt(retrieved: Sequence[str] | None, k: int = 4) -> str:
    """The prompt text: the first `k` retrieved captions in the template, or the no-retrieval prompt.

    Captions are joined by blank lines and only the last one gets a period.
    """
    if retrieved is None:
        return NO_RETRIEVAL_PROMPT
    return TEMPLATE.replace("||", CAPTION_SEPARATOR.join(retrieved[:k]) + ".")


def prompt_ids(tokenizer, retrieved: Sequence[str] | None, k: int = 4) -> list[int]:
    """Token ids of the prompt: its text's ids, after "</s>" for the families whose reference prompts start so."""
    start = getattr(tokenizer, "smallcap_prompt_start", None)
    return ([] if start is None else [start]) + tokenizer.encode(build_prompt(retrieved, k), add_special_tokens=False)


def caption_ids(tokenizer, caption: str, max_tokens: int = MAX_CAPTION_TOKENS) -> list[int]:
    """Token ids of a target caption, encoded on its own and truncated to `max_tokens`."""
    return tokenizer.encode(caption, add_special_tokens=False)[:max_tokens]


def training_example(tokenizer, caption: str, retrieved: Sequence[str] | None, k: int = 4,
                     max_caption_tokens: int = MAX_CAPTION_TOKENS) -> tuple[list[int], list[int]]:
    """Decoder input ids and already-shifted labels for one (caption, retrieved captions) pair.

    Labels ignore every prompt position but the last, which predicts the caption's first token; the last
    caption position predicts the end token. No further shift is applied in the loss.
    """
    prompt = prompt_ids(tokenizer, retrieved, k)
    target = caption_ids(tokenizer, caption, max_caption_tokens)
    input_ids = prompt + target
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + target + [tokenizer.eos_token_id]
    return input_ids, labels


def pad_right(rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> list[list[int]]:
    """Right-pad integer rows to `length` (default: the longest row)."""
    length = max(map(len, rows)) if length is None else length
    if any(len(row) > length for row in rows):
        raise ValueError(f"a row is longer than the padded length {length}")
    return [list(row) + [value] * (length - len(row)) for row in rows]


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = PAD_TOKEN_ID):
    """Left-pad prompt ids; returns (input_ids, attention_mask, position_ids) tensors."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def collate_training_examples(examples: Sequence[tuple[list[int], list[int]]], pad_to: int | None = None,
                              pad_token_id: int = PAD_TOKEN_ID):
    """Stack (input_ids, labels) pairs into right-padded tensors: inputs padded with the family's `!` id
    (`pad_token_id`, GPT-2's by default), labels with -100."""
    inputs, labels = zip(*examples)
    return (torch.tensor(pad_right(inputs, pad_token_id, pad_to)),
            torch.tensor(pad_right(labels, IGNORE_INDEX, pad_to)))


def clean_caption(tokenizer, new_ids: Sequence[int], end_token_id: int = END_TOKEN_ID) -> str:
    """The caption text of generated ids: everything before the first end token, decoded and stripped.

    An immediate end token gives an empty caption (the reference instead returned the whole prompt).
    """
    new_ids = list(new_ids)
    if end_token_id in new_ids:
        new_ids = new_ids[:new_ids.index(end_token_id)]
    return tokenizer.decode(new_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
