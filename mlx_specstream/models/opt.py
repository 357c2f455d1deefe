"""OPT: learned absolute positions (offset 2), pre- or post-LayerNorm blocks, optional
project_in/project_out when word_embed_proj_dim != hidden_size, tied head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, CausalLM, attention, cache_offset
from ..errors import UserError

_POS_OFFSET = 2  # OPT reserves the first two position rows (padding convention)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    ffn_dim: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: Optional[int] = None
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    _remove_final_layer_norm: bool = False

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.activation_function not in _ACTS:
            raise UserError(f"opt: activation_function {self.activation_function!r} is not supported")
        if not self.layer_norm_elementwise_affine:
            raise UserError("opt: layer_norm_elementwise_affine=False is not supported")


_ACTS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_new": nn.gelu_approx}


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, b = args.hidden_size, args.enable_bias
        self.n_heads = args.num_attention_heads
        self.scale = (h // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(h, h, bias=b)
        self.k_proj = nn.Linear(h, h, bias=b)
        self.v_proj = nn.Linear(h, h, bias=b)
        self.out_proj = nn.Linear(h, h, bias=b)

    def __call__(self, x, mask=None, cache=None, positions=None):
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h = args.hidden_size
        self.pre_ln = args.do_layer_norm_before
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, h, bias=args.enable_bias)
        self.final_layer_norm = nn.LayerNorm(h)
        self.act = _ACTS[args.activation_function]

    def __call__(self, x, mask=None, cache=None, positions=None):
        r = self.self_attn_layer_norm(x) if self.pre_ln else x
        x = x + self.self_attn(r, mask, cache, positions)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        r = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(self.act(self.fc1(r)))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, e = args.hidden_size, args.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(args.vocab_size, e)
        self.embed_positions = nn.Embedding(args.max_position_embeddings + _POS_OFFSET, h)
        if e != h:
            self.project_in = nn.Linear(e, h, bias=False)
            self.project_out = nn.Linear(h, e, bias=False)
        self.layers = [OPTDecoderLayer(args) for _ in range(args.num_hidden_layers)]
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(h)


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = OPTDecoder(args)


class Model(CausalLM, nn.Module):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.word_embed_proj_dim, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.decoder.layers

    def embed(self, inputs, cache=None, positions=None):
        d = self.model.decoder
        if positions is None:
            start = cache_offset(cache)
            positions = mx.arange(start, start + inputs.shape[1])
        h = d.embed_tokens(inputs)
        if "project_in" in d:
            h = d.project_in(h)
        return h + d.embed_positions(positions + _POS_OFFSET)

    def final_norm(self, h):
        d = self.model.decoder
        if "final_layer_norm" in d:
            h = d.final_layer_norm(h)
        if "project_out" in d:
            h = d.project_out(h)
        return h

    def token_embedding(self, ids):
        d = self.model.decoder
        h = d.embed_tokens(ids)
        return d.project_in(h) if "project_in" in d else h

    def head_module(self):
        return (self.model.decoder.embed_tokens if self.args.tie_word_embeddings else self.lm_head), None

    def head(self, h):
        if self.args.tie_word_embeddings:
            return self.model.decoder.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights):
        # Original fairseq-converted checkpoints save OPTModel, without the "model." prefix.
        weights = {("model." + k if k.startswith("decoder.") else k): v for k, v in weights.items()}
        return super().sanitize(weights)
