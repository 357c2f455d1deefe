"""Tiny configs of families mlx-lm implements (the gate of tree decoding on mlx-lm's own model
code): one per family, small enough that every test decodes in well under a second, with the
family's distinctive options on (sliding windows shorter than the decodes, GQA, MoE routing,
softcaps, multipliers, partial rotary, tied and untied heads)."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

VOCAB = 256
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_theta=10000.0,
)

FAMILIES = {
    "llama": dict(tie_word_embeddings=False),
    "llama_sliding": dict(
        model_type="llama", layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=7
    ),
    "mistral": dict(tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, tie_word_embeddings=False),
    "gemma": dict(head_dim=16, num_key_value_heads=1),
    "gemma2": dict(
        _scale=0.3, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0
    ),
    "gemma3_text": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,
        sliding_window_pattern=2,
        rope_local_base_freq=10000.0,
        rope_theta=1000000.0,
    ),
    "phi": dict(partial_rotary_factor=0.5, layer_norm_eps=1e-5, num_key_value_heads=4),
    "phi3": dict(tie_word_embeddings=False),
    "starcoder2": dict(norm_epsilon=1e-5, tie_word_embeddings=True),
    "olmo2": dict(tie_word_embeddings=False),
    "granite": dict(
        logits_scaling=4.0,
        attention_multiplier=0.2,
        embedding_multiplier=1.5,
        residual_multiplier=0.5,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
    ),
    "qwen2_moe": dict(
        num_experts_per_tok=2,
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        tie_word_embeddings=False,
    ),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}


def family_config(name: str) -> dict:
    cfg = dict(_BASE, model_type=name)
    cfg.update({k: v for k, v in FAMILIES[name].items() if not k.startswith("_")})
    return cfg


def tiny_model(name: str, seed: int = 0):
    """The family's model with random weights (every float tensor normal, scaled by fan-in, so
    that greedy choices are clear-cut)."""
    from mlx_specstream.models import build_model

    model = build_model(family_config(name))
    mx.random.seed(seed)
    scale = FAMILIES[name].get("_scale", 1.0)  # families that scale embeddings up saturate otherwise
    params = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight") or k.endswith("layernorm.weight"):
            params.append((k, 1.0 + 0.1 * mx.random.normal(v.shape)))
        else:
            fan_in = v.shape[-1] if v.ndim > 1 else 64
            params.append(
                (
                    k,
                    mx.random.normal(v.shape) * (2.0 * scale / fan_in**0.5)
                    if v.ndim > 1
                    else 0.1 * mx.random.normal(v.shape),
                )
            )
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    model.eval()
    return model
