"""XGLM decoder for SmallCap: transformers' `XGLMForCausalLM` with its cross-attention reduced by r.

transformers' XGLM layers already cross-attend (`encoder_attn` between self-attention and the MLP, pre-norm by
`encoder_attn_layer_norm`, cached across generation steps); only the attention's widths differ in SmallCap.
The reduced attention is shared with the OPT decoder, whose transformers layers have no cross-attention.
"""

from __future__ import annotations

from torch import nn
from transformers import XGLMConfig, XGLMForCausalLM
from transformers.models.xglm.modeling_xglm import XGLMAttention

from smallcap.decoders import CrossAttentionConfig


class ReducedEncoderAttention(XGLMAttention):
    """Bart-style cross-attention whose inner width is `embed_dim / r`, keys and values read from the encoder.

    All heads are kept, so each head is `embed_dim / (r * heads)` wide, but scores are scaled by the *unreduced*
    head width, `(embed_dim / heads) ** -0.5`: the reference computes the scale before dividing by r (unlike its
    GPT-2 path). Projections are `nn.Linear`, as in the reference's `encoder_attn` checkpoints.
    """

    def __init__(self, embed_dim: int, num_heads: int, reduce_factor: int, encoder_hidden_size: int,
                 dropout: float = 0.0, layer_idx: int | None = None):
        super().__init__(embed_dim, num_heads, dropout=dropout, is_decoder=True, layer_idx=layer_idx)
        if embed_dim % (reduce_factor * num_heads):
            raise ValueError(f"hidden size {embed_dim} is not divisible by reduce factor {reduce_factor} x "
                             f"{num_heads} heads")
        inner = embed_dim // reduce_factor
        self.embed_dim = inner  # XGLMAttention reshapes its output to this width before `out_proj`
        self.head_dim = inner // num_heads
        self.q_proj = nn.Linear(embed_dim, inner)
        self.k_proj = nn.Linear(encoder_hidden_size, inner)
        self.v_proj = nn.Linear(encoder_hidden_size, inner)
        self.out_proj = nn.Linear(inner, embed_dim)


class SmallCapXGLMConfig(CrossAttentionConfig, XGLMConfig):
    """XGLM config plus the reduce factor and encoder width of SmallCap's cross-attention ("this_xglm")."""

    model_type = "this_xglm"


class SmallCapXGLMDecoder(XGLMForCausalLM):
    """XGLM language model whose layers cross-attend to the image through `ReducedEncoderAttention`.

    The sinusoid position table is a non-persistent buffer here; reference checkpoints also stored it
    (`model.embed_positions.weights`), and the loader drops it.
    """

    config_class = SmallCapXGLMConfig
    cross_attention_marker = "encoder_attn"  # the reference trains every parameter whose name contains this

    def __init__(self, config: SmallCapXGLMConfig):
        super().__init__(config)
        for index, layer in enumerate(self.model.layers):
            layer.encoder_attn = ReducedEncoderAttention(
                config.d_model, config.attention_heads, config.cross_attention_reduce_factor,
                config.encoder_hidden_size, dropout=config.attention_dropout, layer_idx=index)
        self.post_init()
