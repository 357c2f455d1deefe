"""Phi (phi-1, phi-1.5, phi-2): parallel attention + MLP, partial rotary, LayerNorm, biased head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from .base import BaseModelArgs, CausalLM, apply_rope, attention
from ..errors import UserError


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    layer_norm_eps: float = 1e-5
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    qk_layernorm: bool = False
    hidden_act: str = "gelu_new"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_act not in _ACTS:
            raise UserError(f"phi: hidden_act {self.hidden_act!r} is not supported ({sorted(_ACTS)})")


_ACTS = {
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu": nn.gelu,
    "relu": nn.relu,
}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h = args.hidden_size
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = hd = h // self.n_heads
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv_heads * hd, bias=True)
        self.dense = nn.Linear(self.n_heads * hd, h, bias=True)
        if args.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(hd, eps=args.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(hd, eps=args.layer_norm_eps)
        self.rope = initialize_rope(
            int(args.partial_rotary_factor * hd), args.rope_theta, False,
            args.rope_scaling, args.max_position_embeddings,
        )

    def __call__(self, x, mask=None, cache=None, positions=None):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_layernorm" in self:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        offset = cache.offset if cache is not None else 0
        # HF computes phi's attention in float32; so do we for half-precision weights.
        q = apply_rope(self.rope, q.astype(mx.float32), offset, positions)
        k = apply_rope(self.rope, k.astype(mx.float32), offset, positions)
        v = v.astype(mx.float32)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, scale=self.scale, mask=mask).astype(x.dtype)
        return self.dense(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = _ACTS[args.hidden_act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, x, mask=None, cache=None, positions=None):
        h = self.input_layernorm(x)
        return x + self.self_attn(h, mask, cache, positions) + self.mlp(h)


class PhiModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [PhiDecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)


class Model(CausalLM, nn.Module):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model_type = args.model_type
        self.model = PhiModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=True)

    @property
    def layers(self):
        return self.model.layers

    def embed(self, inputs, cache=None, positions=None):
        return self.model.embed_tokens(inputs)

    def final_norm(self, h):
        return self.model.final_layernorm(h)

    def head(self, h):
        return self.lm_head(h)

    def sanitize(self, weights):
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
