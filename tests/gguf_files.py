"""Tiny GGUF files written with the ``gguf`` package from tiny random transformers models, laid out
as llama.cpp's converter lays them out (names, Q/K row permutation for llama, norms in F32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi": "phi2"}
LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.dense": "attn_output",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}  # the last three: phi
TOP = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "model.final_layernorm": "output_norm",
    "lm_head": "output",
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab(corpus: str, size: int):
    """(tokens in id order, merges "a b", token types) of a byte-level BPE trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        [corpus],
        trainers.BpeTrainer(
            vocab_size=size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    vocab = t.get_vocab()
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]  # fill to the model's vocabulary
    merges = json.loads(t.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if tok in SPECIALS else 1 for tok in tokens]
    return tokens, merges, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# byte offsets of each type's float16 scale fields in its block
_F16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "Q3_K": (108,),
    "Q2_K": (80, 82),
    "IQ4_NL": (0,),
}


def random_blocks(qtype: str, rows: int, cols: int, rng, scale: float = 1e-3) -> "np.ndarray":
    """(rows, bytes per row) uint8 of a ``qtype`` tensor: random bytes (every bit pattern is a
    valid block) with its float16 scale fields set to random values around ``scale``."""
    import gguf

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.randint(0, 256, size=(rows * cols // block, nbytes)).astype(np.uint8)
    for off in _F16_FIELDS[qtype]:
        d = (scale * rng.uniform(0.5, 1.5, size=raw.shape[0])).astype(np.float16)
        raw[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def write_gguf(hf, path: Path, qtype: str, vocab, per_tensor=None, alignment=None) -> Path:
    """``hf`` (a transformers model of ``ARCH``'s families) -> a GGUF file at ``path``; 2-D weights
    in ``qtype`` (F32, F16, Q8_0, Q4_0, Q4_1), 1-D tensors in F32. ``per_tensor``: a type per
    GGUF tensor kind (``ffn_down``; a list: one per layer); types the gguf package cannot quantize
    (K-quants, IQ4_NL) get random valid blocks instead of the model's weights."""
    import gguf

    cfg = hf.config
    family = cfg.model_type
    arch = ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:  # ("uint16", 64): general.alignment stored as that type, the data aligned by it
        kind, value = alignment
        getattr(w, f"add_{kind}")("general.alignment", value)
        if kind != "bool":
            w.data_alignment = value
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    if arch == "phi2":
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * head_dim))
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    tokens, merges, types = vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    if arch == "phi2":  # llama.cpp fuses phi2's q, k, v rows into attn_qkv
        for i in range(cfg.num_hidden_layers):
            for leaf in ("weight", "bias"):
                pre = f"model.layers.{i}.self_attn."
                state[pre + "qkv." + leaf] = np.concatenate([state.pop(f"{pre}{x}_proj.{leaf}") for x in "qkv"])
    for name, data in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            sub = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{'attn_qkv' if sub == 'self_attn.qkv' else LAYER[sub]}.{parts[-1]}"
            if arch == "llama" and sub in ("self_attn.q_proj", "self_attn.k_proj"):
                data = _permute(data, heads if sub.endswith("q_proj") else kv)
        else:
            gname = f"{TOP[name.rsplit('.', 1)[0]]}.{parts[-1]}"
        kind = gname.split(".")[-2]
        this = (per_tensor or {}).get(kind, qtype)
        if isinstance(this, list):
            this = this[int(gname.split(".")[1])]
        if data.ndim == 1 or this == "F32":
            w.add_tensor(gname, data.astype(np.float32))
        elif this == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        elif this in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            t = getattr(gguf.GGMLQuantizationType, this)
            w.add_tensor(gname, gguf.quants.quantize(data, t), raw_dtype=t)
        else:  # no quantizer in the gguf package: random valid blocks of this shape
            rng = np.random.RandomState(len(gname))
            w.add_tensor(
                gname,
                random_blocks(this, data.shape[0], data.shape[1], rng, 2.0 / data.shape[1]),
                raw_dtype=getattr(gguf.GGMLQuantizationType, this),
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
