"""GGUF files (llama.cpp, Ollama, LM Studio) as models: the header read with every size and
offset checked against the file, the config from its metadata, the tensors under the HF names our
families use (llama.cpp's rotary row permutation undone), and the tokenizer from its metadata.

Tensors are read with numpy from the checked spans (:mod:`mlx_specstream.ggml_types`): the types
that are affine at group 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) stay MLX affine
quantization exactly, no re-quantization; Q6_K, Q3_K, Q2_K and IQ4_NL are re-quantized to 8 bits
when weights stay quantized (the measured error said once); F32, F16 and BF16 as they are. Any
other type is refused before a byte of tensor data is read.
"""

from __future__ import annotations

import mmap
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .checkpoint import CheckpointError, build_checked
from .ggml_types import OTHER_TYPES, REQUANT_BITS, TYPES, bits_of, dequantize, read_tensor

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi2": "phi"}
MAX_COUNT = 1 << 20  # tensors, metadata keys
MAX_ELEMENTS = 1 << 40
MAX_DEPTH = 4  # nested metadata arrays
LIMITS = {
    "block_count": 1024,
    "embedding_length": 1 << 16,
    "feed_forward_length": 1 << 18,
    "attention.head_count": 1024,
    "attention.head_count_kv": 1024,
    "context_length": 1 << 24,
}

# metadata value types: code -> struct format (scalars), 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be used: the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: Tuple[int, ...]  # numpy order (rows first): ggml's dimensions reversed
    type_name: str
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: Dict[str, Any]
    tensors: Dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _Reader:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated or corrupt header (needs {n} bytes at offset {self.pos}, "
                f"the file has {len(self.buf)})"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("<Q")))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")  # llama.cpp vocabularies hold invalid UTF-8 pieces

    def count(self, what: str, item_min_bytes: int = 1) -> int:
        n = self.scalar("<Q")
        if n * item_min_bytes > len(self.buf) - self.pos:  # every item takes bytes the file must hold
            raise GGUFError(f"{self.path}: {what} count {n} does not fit the file")
        return n

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            if depth >= MAX_DEPTH:
                raise GGUFError(f"{self.path}: metadata arrays nested deeper than {MAX_DEPTH}")
            itype = self.scalar("<I")
            size = struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8
            n = self.count("metadata array", size)
            if itype in _SCALARS:  # one read for a numeric array
                return np.frombuffer(self.take(n * size), dtype=np.dtype(_SCALARS[itype])).tolist()
            return [self.value(itype, depth + 1) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown metadata value type {vtype}")


def read_gguf(path) -> GGUFFile:
    """The header of a GGUF file, every tensor's span checked to lie inside the file, aligned,
    sized by its type and shape, and disjoint from the others."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path)  # slices of an mmap are copies: nothing outlives the with
    except (OSError, ValueError) as e:
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"cannot read {path}: {e}") from e


def _parse(buf, path: Path) -> GGUFFile:
    r = _Reader(buf, path)
    try:
        if bytes(r.take(4)) != GGUF_MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2, 3)")
        n_tensors, n_kv = r.count("tensor", 24), r.count("metadata key", 12)
        if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
            raise GGUFError(f"{path}: {n_tensors} tensors / {n_kv} metadata keys is beyond any model")
        meta: Dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            if key in meta:
                raise GGUFError(f"{path}: metadata key {key!r} appears twice")
            meta[key] = r.value(r.scalar("<I"))
        raw = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions")
            dims = [r.scalar("<Q") for _ in range(n_dims)]
            raw.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
        align = meta.get("general.alignment", 32)
        # (tensors are read by our own reader from these offsets, so the alignment used is this one)
        if (
            isinstance(align, bool)
            or not isinstance(align, int)
            or align <= 0
            or align & (align - 1)
            or align > 1 << 16
        ):
            raise GGUFError(f"{path}: general.alignment {align!r} is not a power of two")
        data_start = (r.pos + align - 1) // align * align
    except struct.error as e:
        raise GGUFError(f"{path}: truncated or corrupt header ({e})") from None
    size = len(buf)
    tensors: Dict[str, TensorInfo] = {}
    spans = []
    for name, dims, tcode, off in raw:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        if tcode not in TYPES:
            kind = OTHER_TYPES.get(tcode, f"type {tcode}")
            raise GGUFError(
                f"{path}: tensor {name!r} is {kind}; supported: "
                f"{', '.join(t.name for t in TYPES.values())} (re-export the model with one of those)"
            )
        tname, block, bbytes = TYPES[tcode].name, TYPES[tcode].block, TYPES[tcode].nbytes
        n = int(np.prod(dims, dtype=object))
        if any(d < 1 for d in dims) or n > MAX_ELEMENTS or dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} has impossible dimensions {dims} for {tname}")
        nbytes = n // block * bbytes
        if off % align or data_start + off + nbytes > size:
            raise GGUFError(
                f"{path}: tensor {name!r} ({nbytes} bytes at data offset {off}) lies outside the "
                f"file ({size} bytes) or is misaligned: truncated or corrupt"
            )
        spans.append((off, off + nbytes, name))
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), tname, data_start + off, nbytes)
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GGUFError(f"{path}: tensors {an!r} and {bn!r} overlap in the file")
    return GGUFFile(path, version, meta, tensors)


# ---------------------------------------------------------------- config


def _num(meta: dict, key: str, default=None, kind=int):
    v = meta.get(key, default)
    if v is None:
        raise GGUFError(f"metadata lacks {key!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise GGUFError(f"metadata {key!r} = {v!r} is not a {kind.__name__}")
    return kind(v)


def config_from_gguf(g: GGUFFile) -> dict:
    """An HF-style ``config.json`` for the file's architecture."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{g.path}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    m, p = g.metadata, arch + "."
    for k, hi in LIMITS.items():
        if p + k in m and not 1 <= _num(m, p + k) <= hi:
            raise GGUFError(f"{g.path}: metadata {p + k} = {m[p + k]} is out of range (1..{hi})")
    if "rope_freqs.weight" in g.tensors:
        raise GGUFError(f"{g.path}: Llama-3.1-style rope frequency factors (rope_freqs.weight) are not supported yet")
    heads = _num(m, p + "attention.head_count")
    hidden = _num(m, p + "embedding_length")
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{g.path}: no token_embd.weight tensor")
    vocab = embd.shape[0]
    cfg = {
        "model_type": ARCHITECTURES[arch],
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
                "phi": "PhiForCausalLM",
            }[ARCHITECTURES[arch]]
        ],
        "hidden_size": hidden,
        "num_hidden_layers": _num(m, p + "block_count"),
        "intermediate_size": _num(m, p + "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _num(m, p + "attention.head_count_kv", heads),
        "max_position_embeddings": _num(m, p + "context_length", 2048),
        "vocab_size": vocab,
        "rope_theta": _num(m, p + "rope.freq_base", 10000.0, float),
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }
    if hidden % heads:
        raise GGUFError(f"{g.path}: embedding_length {hidden} is not a multiple of head_count {heads}")
    head_dim = _num(m, p + "attention.key_length", hidden // heads)
    if head_dim != hidden // heads:
        cfg["head_dim"] = head_dim
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if "tokenizer.ggml." + key in m:
            cfg[name] = _num(m, "tokenizer.ggml." + key)
    scaling = m.get(p + "rope.scaling.type")
    if scaling in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": _num(m, p + "rope.scaling.factor", kind=float)}
        if scaling == "yarn":
            cfg["rope_scaling"]["original_max_position_embeddings"] = _num(
                m, p + "rope.scaling.original_context_length", cfg["max_position_embeddings"]
            )
    elif scaling not in (None, "none"):
        raise GGUFError(f"{g.path}: rope scaling {scaling!r} is not supported (linear, yarn)")
    if cfg["model_type"] == "phi":
        cfg.update(
            layer_norm_eps=_num(m, p + "attention.layer_norm_epsilon", 1e-5, float),
            partial_rotary_factor=_num(m, p + "rope.dimension_count", head_dim) / head_dim,
            hidden_act="gelu_new",
            qk_layernorm=False,
        )
    else:
        cfg["rms_norm_eps"] = _num(m, p + "attention.layer_norm_rms_epsilon", 1e-6, float)
        cfg["hidden_act"] = "silu"
    if cfg["model_type"] == "qwen2":
        cfg["attention_bias"] = True
    return cfg


# ---------------------------------------------------------------- tensors

_LAYER = {  # llama.cpp name -> HF name inside model.layers.N (llama, qwen2, qwen3)
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_PHI_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
    "attn_norm": "input_layernorm",
    "attn_q_norm": "self_attn.q_layernorm",
    "attn_k_norm": "self_attn.k_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PHI_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.final_layernorm", "output": "lm_head"}


def hf_name(name: str, model_type: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (``.scales``/``.biases``
    of quantized tensors follow their weight)."""
    layer, top = (_PHI_LAYER, _PHI_TOP) if model_type == "phi" else (_LAYER, _TOP)
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer and parts[1].isdigit():
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in top:
        return f"{top[parts[0]]}.{parts[1]}"
    raise GGUFError(f"tensor {name!r} has no counterpart in the {model_type} model")


def _unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation for rotary embeddings (rows of a weight, its scales
    or biases move together): rows (h, 2, d/2) were written as (h, d/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights_from_gguf(
    g: GGUFFile, config: dict, *, keep_quantized: bool = True
) -> Tuple[Dict[str, mx.array], Dict[str, int], Dict[str, float]]:
    """``(weights under HF names, bits of each quantized layer path, per re-quantized type the
    largest error relative to the tensor's largest value)``. The tensors are read from the spans
    the header check validated."""
    model_type = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    types = {t.name: t for t in TYPES.values()}
    out: Dict[str, mx.array] = {}
    bits: Dict[str, int] = {}
    errors: Dict[str, float] = {}
    data = np.memmap(g.path, dtype=np.uint8, mode="r")
    for name, info in g.tensors.items():
        t = types[info.type_name]
        stem, leaf = name.rsplit(".", 1)
        quantized = keep_quantized and leaf == "weight" and t.block > 1 and len(info.shape) == 2
        raw = np.array(data[info.offset : info.offset + info.nbytes])  # a copy: the map closes with this call
        pieces = read_tensor(t, raw, info.shape, keep_quantized=quantized)
        if leaf != "weight":
            pieces = {leaf: pieces.pop("weight")}
        if quantized and t.affine_bits is None:
            errors[t.name] = max(errors.get(t.name, 0.0), _requant_error(pieces, raw, t, info.shape))
        kind = stem.split(".")[-1]
        if kind == "attn_qkv":  # fused (phi2 exports): rows q, k, v — scales and biases split with them
            cut = np.cumsum([heads * hd, kv_heads * hd])
            parts = {k: mx.split(v, cut.tolist(), axis=0) for k, v in pieces.items()}
            targets = [stem[: -len("attn_qkv")] + t for t in ("attn_q", "attn_k", "attn_v")]
            split = [(tg, {k: parts[k][i] for k in parts}) for i, tg in enumerate(targets)]
        else:
            split = [(stem, pieces)]
        for tstem, tp in split:
            path = hf_name(f"{tstem}.weight", model_type)[: -len(".weight")]
            if quantized:
                bits[path] = bits_of(t)
            sub = tstem.split(".")[-1]
            for k, v in tp.items():
                if model_type == "llama" and sub in ("attn_q", "attn_k"):
                    v = _unpermute(v, heads if sub == "attn_q" else kv_heads)
                out[f"{path}.{k}"] = v
    del data
    return out, bits, errors


def _requant_error(pieces: Dict[str, mx.array], raw: np.ndarray, t, shape) -> float:
    w = mx.array(dequantize(t, raw.reshape(-1, t.nbytes)).reshape(shape))
    back = mx.dequantize(pieces["weight"], pieces["scales"], pieces["biases"], group_size=32, bits=REQUANT_BITS)
    return float(mx.max(mx.abs(back - w)).item()) / (float(mx.max(mx.abs(w)).item()) or 1.0)


def quantization_config(bits: Dict[str, int]) -> Optional[dict]:
    """mlx-lm's ``quantization`` config for per-layer GGUF types: the most common bits as the
    default, per-path overrides for the rest; float layers stay float (no ``.scales``)."""
    if not bits:
        return None
    values = list(bits.values())
    default = max(set(values), key=values.count)
    q: Dict[str, Any] = {"group_size": 32, "bits": default, "mode": "affine"}
    for path, b in bits.items():
        if b != default:
            q[path] = {"group_size": 32, "bits": b}
    return q


# ---------------------------------------------------------------- tokenizer


def _save_tokenizer_by_transformers(g: GGUFFile, folder: Path) -> None:
    from transformers import AutoTokenizer

    try:  # the header was checked by our reader already; this reads the metadata again (gguf package)
        tok = AutoTokenizer.from_pretrained(str(g.path.parent), gguf_file=g.path.name)
    except Exception as e:  # noqa: BLE001 - any failure here means: no tokenizer from this transformers
        raise GGUFError(
            f"{g.path}: this transformers cannot convert GGUF tokenizers ({type(e).__name__}: {e}); "
            "install transformers >= 5.2 (or the gguf package)"
        ) from e
    tok.save_pretrained(str(folder))


def save_tokenizer(g: GGUFFile, folder: Path) -> None:
    """Write the file's tokenizer (vocabulary, merges, special tokens, chat template) as
    ``tokenizer.json`` + ``tokenizer_config.json``, built by transformers' own GGUF tokenizer
    converter so the ids equal ``AutoTokenizer.from_pretrained(..., gguf_file=...)``'s."""
    try:
        from transformers import PreTrainedTokenizerFast  # mlx-lm's dependency: always present
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            _SPECIAL_TOKENS,
            convert_gguf_tokenizer,
        )
    except ImportError:  # a transformers without this module layout: its public GGUF path
        return _save_tokenizer_by_transformers(g, folder)
    m = g.metadata
    grouped = {
        group: {name: m[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in m}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tok_dict:
        raise GGUFError(f"{g.path}: no tokenizer in the metadata (tokenizer.ggml.tokens)")
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)
    _check_vocabulary(g, tok_dict)
    tokens = tok_dict["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        i = m.get(f"tokenizer.ggml.{key}")
        tok_config[name] = tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    try:  # the Rust tokenizers library raises bare Exceptions (e.g. a merge of unknown tokens)
        fast, extra = convert_gguf_tokenizer(g.architecture, tok_dict)
        tok = PreTrainedTokenizerFast(tokenizer_object=fast, **tok_config, **extra)
    except Exception as e:  # noqa: BLE001 - the file's vocabulary, checked above as far as we can
        raise GGUFError(f"{g.path}: cannot build its tokenizer: {type(e).__name__}: {str(e)[:300]}") from e
    tok.save_pretrained(str(folder))


TOKEN_TYPES = range(0, 7)  # llama.cpp's: undefined, normal, unknown, control, user-defined, unused, byte


def _check_vocabulary(g: GGUFFile, tok: dict) -> None:
    """What a tokenizer converter would take silently and get wrong: per-token arrays shorter or
    longer than the token list (tokens then lose their type or score), a token twice (every later
    id shifts when the vocabulary becomes a dict), more tokens than the embedding has rows (ids the
    model cannot look up), token types llama.cpp does not define, merges that are not two tokens."""
    where = f"{g.path}: tokenizer.ggml"
    tokens = tok["tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{where}.tokens must be a non-empty array of strings")
    embd = g.tensors.get("token_embd.weight")
    if embd is not None and len(tokens) > embd.shape[0]:
        raise GGUFError(f"{where}.tokens names {len(tokens)} tokens, but token_embd has {embd.shape[0]} rows")
    first: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        j = first.setdefault(t, i)
        if j != i:
            raise GGUFError(f"{where}.tokens holds {t!r} twice (ids {j} and {i}): every later id would shift")
    for key in ("token_type", "scores"):
        arr = tok.get(key)
        if arr is not None and (not isinstance(arr, list) or len(arr) != len(tokens)):
            n = len(arr) if isinstance(arr, list) else type(arr).__name__
            raise GGUFError(f"{where}.{key} has {n} entries for {len(tokens)} tokens")
    bad = next((t for t in tok.get("token_type") or [] if not (isinstance(t, int) and t in TOKEN_TYPES)), None)
    if bad is not None:
        raise GGUFError(f"{where}.token_type holds {bad!r}: token types are 0..6")
    merges = tok.get("merges")
    if merges is not None:
        wrong = (
            next((m for m in merges if not isinstance(m, str) or len(m.split(" ")) != 2 or "" in m.split(" ")), 0)
            if isinstance(merges, list)
            else merges
        )
        if wrong != 0:
            raise GGUFError(f"{where}.merges holds {wrong!r}: each merge is two tokens separated by one space")


def load_gguf(path, *, dequantize: bool, dtype: Optional[mx.Dtype] = None, say=None):
    """``(model, config, tokenizer_folder)`` from a GGUF file: quantized layers kept (MLX affine,
    group 32) or dequantized to ``dtype`` (default float32). ``say``: where the re-quantization
    error of types MLX's affine format cannot hold goes (default: stderr)."""
    g = read_gguf(path)
    config = config_from_gguf(g)
    weights, bits, errors = weights_from_gguf(g, config, keep_quantized=not dequantize)
    for name, err in sorted(errors.items()):
        (say or _stderr)(
            f"[{g.path.name}: {name} tensors re-quantized to {REQUANT_BITS}-bit affine (group 32): "
            f"largest error {err:.2e} of the tensor's largest weight]"
        )
    if bits:
        # Scales in float32 where the model runs in float32 (exact for the K-quants' d·sc); in the
        # half precision it runs in otherwise (float32 scales would promote every activation).
        scale_dtype = (
            mx.float32
            if (dtype or (mx.float32 if mx.default_device() == mx.cpu else mx.float16)) == mx.float32
            else (dtype or mx.float16)
        )
        for layer in bits:
            for k in ("scales", "biases"):
                weights[f"{layer}.{k}"] = weights[f"{layer}.{k}"].astype(scale_dtype)
    q = quantization_config(bits)
    if q is not None:
        config["quantization"] = config["quantization_config"] = q
    model, weights = build_checked(config, weights, g.path)
    if dtype is not None or dequantize:
        target = dtype or mx.float32
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    folder = Path(tempfile.mkdtemp(prefix="specstream-gguf-tok-"))
    save_tokenizer(g, folder)
    return model, config, folder


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def tensor_types(g: GGUFFile) -> List[str]:
    return sorted({t.type_name for t in g.tensors.values()})
