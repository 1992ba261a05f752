"""Continuous batching for exact beam search on GPT-2-family SmallCap decoders.

A fixed number of images (slots) decode together, each with its beams. When an image's beams are done (it holds
`num_beams` finished hypotheses, the rule of beam search with `early_stopping=True`, or it reached
`max_new_tokens`), its rows leave the batch and the next waiting image's prompt is prefilled into the freed slot,
so no batch runs to its longest caption and no row decodes past its own end.

The self-attention cache holds, per image (slot), its prompt's keys/values once (its beams share the prompt),
left-padded to the longest prompt of the call with the padding masked, followed by its generated positions,
step-major (the token of beam b at step t at `width + t * beams + b`). Beams are never copied when beam search
reorders them: each row records which beam wrote each step of its history (`ancestor`), and its attention mask
shows it exactly those positions, so a step writes one position per row and attends once per layer
(`scaled_dot_product_attention` over the slot's positions with the beams as its queries). Cross-attention
keys/values are kept once per image, computed in the prefill.

The selection rule is the one of transformers' beam search with `early_stopping=True`: each step keeps the top
2·beams continuations over beams × vocabulary (scores are plain sums of log-probabilities divided by the new
length to the power `length_penalty`), an end token among the top `num_beams` of them becomes a finished
hypothesis, the best `num_beams` non-finished continuations run on, and the image's caption is its best finished
hypothesis. Written for this project; captions are token-identical to `model.generate` (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from smallcap.modeling import SmallCapDecoder
from smallcap.prompt import left_pad

if TYPE_CHECKING:
    from smallcap.generation import GenerationSettings

_NOT_RUNNING = -1.0e9  # the score transformers gives beams that must not be chosen (as in its beam search)
_PREFILL_GROUP = 4  # prompts per prefill batch on CPU (see `_Slots.fill`)


def supports_continuous_batching(model, settings: GenerationSettings) -> bool:
    """Whether `continuous_beam_search` decodes this model with these settings (exactly as transformers would):
    a GPT-2-family decoder, beam search without sampling or n-gram blocking, `early_stopping=True`."""
    config = model.decoder.config
    return (isinstance(model.decoder, SmallCapDecoder) and settings.early_stopping is True
            and not settings.do_sample and settings.no_repeat_ngram_size == 0
            and not getattr(config, "reorder_and_upcast_attn", False)
            and getattr(model.config, "eos_token_id", None) is not None)


class PackedLinear(torch.nn.Module):
    """A float32 `nn.Linear` on CPU whose weight is packed once for oneDNN's matrix product (still float32).

    For GPT-2's 50257 x 768 LM head: a plain product repacks the weight on every call, so a decoding step of 48
    rows took about 64 ms instead of 44 ms, against about 0.09 s for packing once (`rows`: the expected number
    of rows, a hint for the packing)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight, rows)
        self.bias = linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed, self.bias, "none", [], "")


def packed_lm_head(lm_head: torch.nn.Module, rows: int) -> torch.nn.Module:
    """`PackedLinear` for a float32 `nn.Linear` head on CPU (packed once per decoding call, so the model is left
    as it is); any other head as it is."""
    weight = getattr(lm_head, "weight", None)
    if (type(lm_head) is not torch.nn.Linear or weight.device.type != "cpu" or weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return lm_head
    try:  # private oneDNN ops (torch 2.x CPU builds): a build without them decodes with the plain head
        return PackedLinear(lm_head, rows)
    except (AttributeError, RuntimeError, NotImplementedError):
        return lm_head


class _Slots:
    """The decoding state of the images in flight: caches, running beams and finished hypotheses."""

    def __init__(self, model, slots: int, prompt_width: int, settings: GenerationSettings):
        decoder = model.decoder
        config = decoder.config
        self.transformer = decoder.transformer
        self.beams, self.max_new = settings.num_beams, settings.max_new_tokens
        self.lm_head = packed_lm_head(decoder.lm_head, slots * self.beams)
        self.length_penalty = settings.length_penalty
        self.eos = int(model.config.eos_token_id)
        self.model = model
        heads = config.n_head
        head_dim = config.n_embd // heads
        cross = self.transformer.h[0].crossattention
        layers = len(self.transformer.h)
        # Attention runs in float32 whatever the weights' dtype: on CPU its small batched products and softmax are
        # slower in bfloat16, and they are more precise this way (the linear layers keep the model's dtype).
        device, dtype = model.device, torch.float32
        self.dtype = model.dtype
        self.width = prompt_width
        positions = prompt_width + self.max_new * self.beams
        # (layers, slots, heads, positions, head_dim): a slot's prompt, then its generated positions (module docstring)
        self.keys = torch.zeros(layers, slots, heads, positions, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.prompt_bias = torch.full((slots, prompt_width), float("-inf"), device=device, dtype=dtype)
        # ancestor[slot, beam, t]: the beam whose token at step t is in this beam's history (it wrote that position)
        self.ancestor = torch.zeros(slots, self.beams, self.max_new, dtype=torch.long, device=device)
        self.cross_k: torch.Tensor | None = None  # (layers, slots, heads, encoder tokens, reduced head width)
        self.cross_v: torch.Tensor | None = None
        self.cross_head_dim = cross.head_dim
        self.image = [-1] * slots
        self.prompt_len = torch.zeros(slots, dtype=torch.long, device=device)
        self.step = torch.zeros(slots, dtype=torch.long, device=device)  # tokens chosen so far per slot
        self.tokens = torch.zeros(slots, self.beams, self.max_new, dtype=torch.long, device=device)
        self.scores = torch.zeros(slots, self.beams, dtype=torch.float32, device=device)
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(slots)]

    @property
    def count(self) -> int:
        return len(self.image)

    def fill(self, slots: list[int], images: list[int], prompts: Sequence[Sequence[int]],
             encoder_states: torch.Tensor) -> torch.Tensor:
        """Prefill the prompts of `images` into `slots`; returns the last prompt position's logits (one row each).

        On CPU the prompts run in groups of `_PREFILL_GROUP` of similar length (a CPU's matrix products are as
        efficient on a few hundred rows as on a thousand, so the left padding of one group of all would be pure
        waste); elsewhere in one group."""
        group = _PREFILL_GROUP if self.model.device.type == "cpu" else len(images)
        order = sorted(range(len(images)), key=lambda i: len(prompts[images[i]]))
        last: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
        for start in range(0, len(order), group):
            members = order[start:start + group]
            hidden = self._prefill([slots[i] for i in members], [images[i] for i in members], prompts, encoder_states)
            for i, row in zip(members, hidden):
                last[i] = row
        # (the LM head on the last position only, as a plain matrix product: transformers' `logits_to_keep` slice
        # goes through a batched product that copies the whole LM head once per image)
        return self.lm_head(torch.stack(last))

    def _prefill(self, slots: list[int], images: list[int], prompts: Sequence[Sequence[int]],
                 encoder_states: torch.Tensor) -> torch.Tensor:
        """Run the prompts of `images` (one left-padded batch) into `slots`; returns their last hidden states."""
        input_ids, mask, positions = (t.to(self.model.device) for t in left_pad([prompts[i] for i in images]))
        out = self.transformer(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                               encoder_hidden_states=encoder_states[images], use_cache=True)
        self_cache, cross_cache = out.cache.self_attention_cache, out.cache.cross_attention_cache
        keys = torch.stack([layer.keys for layer in self_cache.layers]).float()  # (layers, n, heads, width, head_dim)
        values = torch.stack([layer.values for layer in self_cache.layers]).float()
        cross_k = torch.stack([layer.keys for layer in cross_cache.layers]).float()
        cross_v = torch.stack([layer.values for layer in cross_cache.layers]).float()
        if self.cross_k is None:
            shape = (cross_k.shape[0], self.count, *cross_k.shape[2:])
            self.cross_k = cross_k.new_zeros(shape)
            self.cross_v = cross_v.new_zeros(shape)
        width = input_ids.shape[1]
        for row, (slot, image) in enumerate(zip(slots, images)):
            length = len(prompts[image])
            self.keys[:, slot, :, self.width - length:self.width] = keys[:, row, :, width - length:]
            self.values[:, slot, :, self.width - length:self.width] = values[:, row, :, width - length:]
            self.keys[:, slot, :, :self.width - length] = 0
            self.values[:, slot, :, :self.width - length] = 0
            self.prompt_bias[slot] = float("-inf")
            self.prompt_bias[slot, self.width - length:] = 0
            self.cross_k[:, slot], self.cross_v[:, slot] = cross_k[:, row], cross_v[:, row]
            self.image[slot] = image
            self.prompt_len[slot] = length
            self.step[slot] = 0
            self.finished[slot] = []
            self.scores[slot] = _NOT_RUNNING
            self.scores[slot, 0] = 0  # only the first beam runs at first: the beams start identical
        return out.last_hidden_state[:, -1]

    def keep(self, slots: list[int]) -> None:
        """Drop every slot not in `slots` (in that order) from the batch."""
        index = torch.tensor(slots, dtype=torch.long, device=self.keys.device)
        self.keys, self.values = self.keys.index_select(1, index), self.values.index_select(1, index)
        self.prompt_bias, self.ancestor = self.prompt_bias[index], self.ancestor[index]
        self.cross_k, self.cross_v = self.cross_k.index_select(1, index), self.cross_v.index_select(1, index)
        self.prompt_len, self.step = self.prompt_len[index], self.step[index]
        self.tokens, self.scores = self.tokens[index], self.scores[index]
        self.image = [self.image[s] for s in slots]
        self.finished = [self.finished[s] for s in slots]

    def forward(self) -> torch.Tensor:
        """One decoder step for every running beam of every slot; returns logits (slots * beams, vocab)."""
        slots, beams = self.count, self.beams
        rows = slots * beams
        device = self.step.device
        step = self.step.repeat_interleave(beams)
        last = self.tokens.view(rows, self.max_new).gather(1, (step - 1)[:, None]).squeeze(1)
        positions = self.prompt_len.repeat_interleave(beams) + step - 1
        t = self.transformer
        hidden = (t.wte(last) + t.wpe(positions))[:, None]  # (rows, 1, width)
        # where each row writes its new key/value: its slot, position width + (step - 1) * beams + beam
        beam = torch.arange(beams, device=device)
        write_slot = torch.arange(slots, device=device).repeat_interleave(beams)[:, None]
        write_at = (self.width + (step - 1) * beams + beam.repeat(slots))[:, None]
        upto = int(self.step.max())  # steps any row has written (the positions beyond are masked for all)
        seen = self.width + upto * beams
        # a generated position is visible to a row when its own history wrote it: step t < the slot's step, and the
        # beam that wrote it is the row's ancestor at step t
        visible = ((self.ancestor[:, :, :upto, None] == beam)
                   & (torch.arange(upto, device=device)[:, None] < self.step[:, None, None, None]))
        gen_bias = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
        bias = torch.cat([self.prompt_bias[:, None].expand(slots, beams, self.width),
                          gen_bias.view(slots, beams, upto * beams)], dim=-1)[:, None]  # (slots, 1, beams, seen)
        width = hidden.shape[-1]
        for layer, block in enumerate(t.h):
            attn = block.attn
            heads = attn.num_heads
            head_dim = width // heads
            every_head = torch.arange(heads, device=device)
            q, k, v = attn.c_attn(block.ln_1(hidden)).float().split(width, dim=2)
            self.keys[layer].index_put_((write_slot, every_head, write_at), k.view(rows, heads, head_dim))
            self.values[layer].index_put_((write_slot, every_head, write_at), v.view(rows, heads, head_dim))
            q = q.view(slots, beams, heads, head_dim).transpose(1, 2)  # a slot's beams are its queries
            out = F.scaled_dot_product_attention(q, self.keys[layer, :, :, :seen], self.values[layer, :, :, :seen],
                                                 attn_mask=bias, scale=attn.scaling)
            hidden = hidden + attn.c_proj(out.transpose(1, 2).reshape(rows, 1, width).to(self.dtype))
            cross = block.crossattention
            q = cross.q_attn(block.ln_cross_attn(hidden)).float().view(slots, beams, heads, self.cross_head_dim)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), self.cross_k[layer], self.cross_v[layer],
                                                 scale=cross.scaling)
            hidden = hidden + cross.c_proj(out.transpose(1, 2).reshape(rows, 1, heads * self.cross_head_dim)
                                           .to(self.dtype))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return self.lm_head(t.ln_f(hidden)[:, 0])

    def select(self, logits: torch.Tensor, slots: list[int]) -> list[int]:
        """The beam-search step for `slots` given their rows' logits; returns the slots that are done.

        `slots` is either every slot in order (a decoding step) or newly filled ones (their first token, chosen from
        the prefill's logits)."""
        beams = self.beams
        index = torch.tensor(slots, dtype=torch.long, device=self.scores.device)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(len(slots), beams, vocab) + self.scores[index][:, :, None]).view(len(slots), -1)
        top_scores, top_index = torch.topk(totals, k=2 * beams)
        source, token = top_index // vocab, top_index % vocab
        step = self.step[index]
        at_limit = (step + 1 >= self.max_new)[:, None]
        ends = (token == self.eos) | at_limit
        running_scores = top_scores + ends.to(torch.float32) * _NOT_RUNNING
        keep = torch.topk(running_scores, k=beams)[1]
        keep_source = source.gather(1, keep)
        history = keep_source[:, :, None].expand(-1, -1, self.max_new)
        tokens = self.tokens[index].gather(1, history)
        tokens[torch.arange(len(slots)), :, step] = token.gather(1, keep)
        ancestor = self.ancestor[index].gather(1, history)
        ancestor[torch.arange(len(slots)), :, step] = torch.arange(beams, device=ancestor.device)
        # New finished hypotheses: an end among the top `beams` continuations (every one of them at the token limit).
        # One transfer from the device per step, then plain Python over the rows that have any.
        ending = ends[:, :beams].any(dim=1).nonzero().flatten()
        if len(ending):
            finals = (top_scores, ends, source, token)
            scores_, ends_, source_, token_ = ([row[:beams] for row in t[ending].tolist()] for t in finals)
            histories, lengths = self.tokens[index[ending]].tolist(), (step[ending] + 1).tolist()
            for i, row in enumerate(ending.tolist()):
                slot, length = slots[row], lengths[i]
                for rank in range(beams):
                    if ends_[i][rank]:
                        ids = histories[i][source_[i][rank]][:length - 1] + [token_[i][rank]]
                        self.finished[slot].append((scores_[i][rank] / length ** self.length_penalty, ids))
                self.finished[slot] = sorted(self.finished[slot], key=lambda h: -h[0])[:beams]
        done = [slot for slot in slots if len(self.finished[slot]) == beams]
        self.tokens[index] = tokens
        self.scores[index] = running_scores.gather(1, keep)
        self.ancestor[index] = ancestor
        self.step[index] = step + 1
        return done


@torch.inference_mode()
def continuous_beam_search(model, prompts: Sequence[Sequence[int]], encoder_hidden_states: torch.Tensor,
                           settings: GenerationSettings, max_in_flight: int | None = None) -> list[list[int]]:
    """Beam-search new token ids for each prompt (end token kept), `max_in_flight` images decoding at a time
    (default: all), refilling the batch from the waiting images as images finish. See the module docstring."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    in_flight = min(max_in_flight or len(prompts), len(prompts))
    encoder_hidden_states = encoder_hidden_states.to(model.device, model.dtype)
    state = _Slots(model, in_flight, max(map(len, prompts)), settings)
    results: list[list[int] | None] = [None] * len(prompts)
    waiting = list(range(len(prompts)))
    free = list(range(in_flight))
    running: list[int] = []
    while True:
        while free and waiting:  # prefill waiting images into free slots; some may finish at their first token
            slots, free = free[:len(waiting)], free[len(waiting):]
            images, waiting = waiting[:len(slots)], waiting[len(slots):]
            logits = state.fill(slots, images, prompts, encoder_hidden_states)
            done = state.select(logits.repeat_interleave(settings.num_beams, dim=0), slots)
            for slot in done:
                results[state.image[slot]] = state.finished[slot][0][1]
            free += done
            running += [s for s in slots if s not in done]
        if not running:
            break
        if len(running) < state.count:  # nothing left to refill: shrink the batch to the running images
            order = sorted(running)
            state.keep(order)
            running = list(range(len(order)))
            free = []
        logits = state.forward()
        done = state.select(logits, list(range(state.count)))
        for slot in done:
            results[state.image[slot]] = state.finished[slot][0][1]
        running = [s for s in running if s not in done]
        free += done
    return results  # type: ignore[return-value]
