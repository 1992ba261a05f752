"""OPT decoder for SmallCap: transformers' `OPTForCausalLM` with a reduced cross-attention sub-layer per layer.

transformers' OPT layers have no cross-attention, so each layer gains the reference's `encoder_attn` (the
reduced attention shared with XGLM) and `encoder_attn_layer_norm`, between self-attention and the MLP.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from smallcap.decoders import CrossAttentionConfig
from smallcap.decoders.xglm import ReducedEncoderAttention


class SmallCapOPTConfig(CrossAttentionConfig, OPTConfig):
    """OPT config plus the reduce factor and encoder width of SmallCap's cross-attention ("this_opt")."""

    model_type = "this_opt"


class SmallCapOPTDecoderLayer(OPTDecoderLayer):
    """OPT layer with `h = h + CrossAttn(encoder_attn_layer_norm(h), image)` after its self-attention block.

    With `do_layer_norm_before=False` (OPT-350m) the reference applies `self_attn_layer_norm` after the
    cross-attention block instead of straight after self-attention; this does the same.
    """

    def __init__(self, config: SmallCapOPTConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.encoder_attn = ReducedEncoderAttention(
            config.hidden_size, config.num_attention_heads, config.cross_attention_reduce_factor,
            config.encoder_hidden_size, dropout=config.attention_dropout, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(self.embed_dim,
                                                    elementwise_affine=config.layer_norm_elementwise_affine)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache=None, use_cache: bool | None = False, position_ids: torch.LongTensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Self-attention, cross-attention to `encoder_hidden_states`, then OPT's feed-forward block."""
        kwargs.pop("encoder_attention_mask", None)  # SmallCap attends to every image token
        drop = nn.functional.dropout
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, cache=cache, position_ids=position_ids,
                                          attention_mask=attention_mask, **kwargs)
        hidden_states = residual + drop(hidden_states, p=self.dropout, training=self.training)

        # Cross-attention keys/values are recomputed each step (no cache): 50 image tokens make that cheap.
        residual = hidden_states
        hidden_states, _ = self.encoder_attn(self.encoder_attn_layer_norm(hidden_states),
                                             key_value_states=encoder_hidden_states)
        hidden_states = residual + drop(hidden_states, p=self.dropout, training=self.training)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        hidden_states = residual + drop(hidden_states, p=self.dropout, training=self.training)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class SmallCapOPTDecoder(OPTForCausalLM):
    """OPT language model whose layers cross-attend to the image (`SmallCapOPTDecoderLayer`)."""

    config_class = SmallCapOPTConfig
    cross_attention_marker = "encoder_attn"  # the reference trains every parameter whose name contains this

    def __init__(self, config: SmallCapOPTConfig):
        super().__init__(config)
        self.model.decoder.layers = nn.ModuleList(
            SmallCapOPTDecoderLayer(config, layer_idx=index) for index in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache=None, inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, position_ids: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """OPT's forward (`encoder_hidden_states` reaches the layers through `kwargs`), returning the output
        type with cross-attentions that transformers' encoder-decoder models expect."""
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                                 inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                 position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
        return output if isinstance(output, tuple) else CausalLMOutputWithCrossAttentions(**output)
