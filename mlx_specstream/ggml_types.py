"""GGML tensor types as people download them, decoded with numpy: to MLX affine quantization
(packed weights, scales, biases — group 32) where the type *is* affine at group 32, to float32
values otherwise.

Exact (``scale · q + bias`` reproduces ``gguf.quants.dequantize`` bit for bit in float32):
Q4_0, Q4_1, Q8_0 (scales from float16 fields, kept float16 as MLX's own reader gives them), Q5_0,
Q5_1 and the K-quants Q4_K, Q5_K (32-value sub-blocks with a scale and a min each: the products
``d·sc`` and ``dmin·m`` need float32 scales). Not affine at group 32 — Q6_K, Q3_K, Q2_K (16-value
sub-blocks), IQ4_NL (a non-linear codebook) — are decoded to values; a caller that keeps weights
quantized re-quantizes them (:func:`requantize`).

Block layouts follow ggml's ``block_*`` structs (``ggml-common.h``), little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # values per block
    nbytes: int  # bytes per block
    affine_bits: Optional[int] = None  # MLX affine bits at group 32 when exact, else None


TYPES: Dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    30: GGMLType("BF16", 1, 2),
    2: GGMLType("Q4_0", 32, 18, 4),
    3: GGMLType("Q4_1", 32, 20, 4),
    8: GGMLType("Q8_0", 32, 34, 8),
    6: GGMLType("Q5_0", 32, 22, 5),
    7: GGMLType("Q5_1", 32, 24, 5),
    12: GGMLType("Q4_K", QK_K, 144, 4),
    13: GGMLType("Q5_K", QK_K, 176, 5),
    14: GGMLType("Q6_K", QK_K, 210),
    11: GGMLType("Q3_K", QK_K, 110),
    10: GGMLType("Q2_K", QK_K, 84),
    20: GGMLType("IQ4_NL", 32, 18),
}
FLOAT_TYPES = frozenset(t.name for t in TYPES.values() if t.block == 1)  # stored as values, not quantized
OTHER_TYPES = {
    9: "Q8_1",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}
REQUANT_BITS = 8  # what a non-affine type becomes when weights stay quantized
_IQ4_NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32 of a float16 field."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """(n, k·width/2) bytes -> (n, k·width) values: each run of width/2 bytes gives ``width``
    values, low nibbles first (ggml's order)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width // 2) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _bits(b: np.ndarray, count: int) -> np.ndarray:
    """(n, k) bytes -> (n, count, k): bit j of every byte."""
    return (b[:, None, :] >> np.arange(count, dtype=np.uint8)[None, :, None]) & 1


def _k_scales(s: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per block."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def affine(t: GGMLType, blocks: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, nbytes) blocks of an affine type -> (q (n, block) uint8, scales, biases (n, block/32)
    float32) with value = scale·q + bias."""
    n = blocks.shape[0]
    if t.name == "Q8_0":
        d = _f16(blocks[:, :2])
        q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return q, d, -128 * d
    if t.name in ("Q4_0", "Q4_1"):
        d = _f16(blocks[:, :2])
        off = 2 if t.name == "Q4_0" else 4
        q = _nibbles(blocks[:, off:], 32).astype(np.uint8)
        return q, d, (-8 * d if t.name == "Q4_0" else _f16(blocks[:, 2:4]))
    if t.name in ("Q5_0", "Q5_1"):
        d = _f16(blocks[:, :2])
        off = 2 if t.name == "Q5_0" else 4
        qh = _bits(blocks[:, off : off + 4], 8).transpose(0, 2, 1).reshape(n, 32)  # bit j of byte i: value 8i+j
        q = (_nibbles(blocks[:, off + 4 :], 32) | (qh << 4)).astype(np.uint8)
        return q, d, (-16 * d if t.name == "Q5_0" else _f16(blocks[:, 2:4]))
    if t.name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales(blocks[:, 4:16])
        if t.name == "Q4_K":
            q = _nibbles(blocks[:, 16:], 64)
        else:  # high bit of sub-block j's values: bit j of qh[0..31]
            q = _nibbles(blocks[:, 48:], 64) | (_bits(blocks[:, 16:48], 8).reshape(n, QK_K) << 4)
        return q.astype(np.uint8), d * sc, -(dmin * mn)
    raise ValueError(f"{t.name} is not affine at group 32")


def dequantize(t: GGMLType, blocks: np.ndarray) -> np.ndarray:
    """(n, nbytes) blocks -> (n, block) float32 values, as ``gguf.quants.dequantize`` computes."""
    n = blocks.shape[0]
    if t.affine_bits is not None:
        q, s, b = affine(t, blocks)
        g = t.block // 32
        return (s.reshape(n, g, 1) * q.reshape(n, g, 32).astype(np.float32) + b.reshape(n, g, 1)).reshape(n, -1)
    if t.name == "Q6_K":
        ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
        lo = _nibbles(ql, 128).reshape(n, 8, 32)  # per 128-value half: 64 low nibbles, then 64 high
        hi = ((qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
        q = (lo | (hi << 4)).astype(np.int8).astype(np.float32) - 32
        scale = d * sc.view(np.int8).astype(np.float32)  # (n, 16): one per 16 values
        return (scale.reshape(n, 16, 1) * q.reshape(n, 16, 16)).reshape(n, QK_K)
    if t.name == "Q3_K":
        hmask, qs, s, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
        lsc = (s[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16) & 0x0F
        hsc = (s[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16) & 3
        scale = d * ((lsc | (hsc << 4)).astype(np.int8).astype(np.float32) - 32)
        ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        high = 1 - _bits(hmask, 8)  # a set mask bit means no -4 offset
        q = ql.reshape(n, 16, 16).astype(np.float32) - 4 * high.reshape(n, 16, 16).astype(np.float32)
        return (scale.reshape(n, 16, 1) * q).reshape(n, QK_K)
    if t.name == "Q2_K":
        s, qs, d, dmin = blocks[:, :16], blocks[:, 16:80], _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        dl, ml = d * (s & 0x0F).astype(np.float32), dmin * (s >> 4).astype(np.float32)
        q = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        return (dl.reshape(n, 16, 1) * q.reshape(n, 16, 16).astype(np.float32) - ml.reshape(n, 16, 1)).reshape(n, QK_K)
    if t.name == "IQ4_NL":
        return _f16(blocks[:, :2]) * _IQ4_NL[_nibbles(blocks[:, 2:], 32)]
    raise ValueError(f"cannot dequantize {t.name}")


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) integers < 2**bits -> MLX's packed (rows, cols·bits/32) uint32: each row a
    little-endian bit stream (32 values fill ``bits`` words exactly)."""
    rows, cols = q.shape
    v = q.reshape(-1, 32).astype(np.uint64)
    words = np.zeros((v.shape[0], bits), np.uint64)
    for j in range(32):  # value j of a group starts at bit j·bits of the group's words
        w, shift = divmod(j * bits, 32)
        words[:, w] |= (v[:, j] << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:
            words[:, w + 1] |= v[:, j] >> np.uint64(32 - shift)
    return words.astype(np.uint32).reshape(rows, cols * bits // 32)


def read_tensor(t: GGMLType, raw: np.ndarray, shape: Tuple[int, ...], *, keep_quantized: bool) -> Dict[str, mx.array]:
    """One tensor's bytes (uint8) -> ``{"weight": ...}`` as floats, or with ``keep_quantized``
    ``{"weight", "scales", "biases"}`` in MLX affine form (group 32; the bits are
    :func:`bits_of`'s). ``shape``: numpy order, rows first."""
    if t.name == "F32":
        return {"weight": mx.array(raw.view(np.float32).reshape(shape))}
    if t.name == "F16":
        return {"weight": mx.array(raw.view(np.float16).reshape(shape))}
    if t.name == "BF16":
        wide = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return {"weight": mx.array(wide.reshape(shape)).astype(mx.bfloat16)}
    rows = int(np.prod(shape[:-1]))
    blocks = raw.reshape(-1, t.nbytes)
    if not keep_quantized or t.affine_bits is None:
        values = dequantize(t, blocks).reshape(shape)
        if not keep_quantized:
            return {"weight": mx.array(values)}
        w, s, b = mx.quantize(mx.array(values.reshape(rows, -1)), group_size=32, bits=REQUANT_BITS)
        return {
            "weight": w.reshape(*shape[:-1], -1),
            "scales": s.reshape(*shape[:-1], -1),
            "biases": b.reshape(*shape[:-1], -1),
        }
    q, s, b = affine(t, blocks)
    # float16 where that holds the scales exactly (the legacy types: MLX's own reader's form),
    # float32 otherwise (K-quants' d·sc products)
    dt = np.float16 if all(np.array_equal(x.astype(np.float16).astype(np.float32), x) for x in (s, b)) else np.float32
    out = {
        "weight": pack(q.reshape(rows, -1), t.affine_bits),
        "scales": s.reshape(rows, -1).astype(dt),
        "biases": b.reshape(rows, -1).astype(dt),
    }
    return {k: mx.array(v.reshape(*shape[:-1], -1)) for k, v in out.items()}


def bits_of(t: GGMLType) -> Optional[int]:
    """The MLX affine bits a type is kept at (None: a float type)."""
    if t.block == 1:
        return None
    return t.affine_bits or REQUANT_BITS
