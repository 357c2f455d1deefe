"""The Medusa-1 baseline: K extra heads (ResBlock + own vocabulary head) on a frozen base,
decoded through the same loop as Speculative Streaming, so both compare on one base."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..checkpoint import CheckpointError, load_adapter_weights, model_dtype, read_json, save_adapter
from ..streams.loss import sample_positions
from ..setting import DecodeSetting
from ..tree import TreeSetting
from .base import Drafter, DraftState, Verified, verify_tree
from ..errors import UserError

MEDUSA_STEM = "medusa_heads"


@dataclass
class MedusaConfig(TreeSetting):
    num_heads: int = 3

    def __post_init__(self):
        if self.num_heads < 1:
            raise UserError(f"num_heads must be >= 1, got {self.num_heads}")
        self.check_tree()

    @property
    def draft_depth(self) -> int:
        return self.num_heads


class ResBlock(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.linear = nn.Linear(h, h)
        self.linear.weight = mx.zeros_like(self.linear.weight)  # starts as the identity

    def __call__(self, x):
        return x + nn.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, h: int, vocab: int):
        super().__init__()
        self.block = ResBlock(h)
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def __call__(self, h):
        return self.lm_head(self.block(h))


class MedusaHeads(nn.Module):
    def __init__(self, config: MedusaConfig, model):
        super().__init__()
        self.config = config
        h, V = model.args.hidden_size, model.args.vocab_size
        self.heads = [MedusaHead(h, V) for _ in range(config.num_heads)]

    def init_from_lm_head(self, model) -> None:
        """Medusa-1 initialisation: every head's vocabulary projection starts as the LM head."""
        probe = mx.eye(model.args.hidden_size)
        w = model.head(probe).T  # (V, h): the head as a matrix, whatever its storage
        for hd in self.heads:
            hd.lm_head.weight = w.astype(hd.lm_head.weight.dtype)

    def __call__(self, h: mx.array) -> mx.array:
        """(..., h) normed final hidden states -> (..., K, V) logits."""
        return mx.stack([hd(h) for hd in self.heads], axis=-2)

    @property
    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def expected_num_params(self, model) -> int:
        h, V = model.args.hidden_size, model.args.vocab_size
        return self.config.num_heads * (h * h + h + h * V)


class MedusaDrafter(Drafter):
    """Verify the tree with the plain target; the heads draft from the final hidden state of
    the last accepted node."""

    def __init__(self, heads: MedusaHeads):
        self.heads = heads
        self.levels, self.setting = (
            heads.config.num_heads,
            DecodeSetting(heads.config.tree_auto or heads.config.tree_paths),
        )
        self.num_params = heads.num_params

    def forward(self, model, plan, state: DraftState, cache) -> Verified:
        tokens, h = verify_tree(model, plan, state, cache)
        return Verified(plan, tokens, model.head(h), lambda best, correction: self.heads(h[best]))


def medusa_loss(
    model,
    medusa: MedusaHeads,
    tokens: mx.array,
    mask: mx.array,
    max_positions: Optional[int] = None,
    sample_seed: int = 0,
    hidden: Optional[mx.array] = None,
):
    """Σ_k CE(head_k(h_t), y[t+1+k]) over target positions; the base is frozen (no gradient).

    ``max_positions`` and ``sample_seed`` sample the positions the heads train on exactly as
    :func:`stream_loss` samples the positions it attaches streams to (so both baselines see the
    same budget); ``hidden`` (B, L, h): the base's final-normed states, when precomputed.
    """
    x, y, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    L = x.shape[1]
    h = mx.stop_gradient(hidden if hidden is not None else model.hidden(x))
    at = mx.array(sample_positions(m, max_positions, sample_seed))
    logits = medusa(h[:, at])  # (B, P, K, V)
    total, metrics = mx.array(0.0), {}
    for k in range(medusa.config.num_heads):
        tgt_pos = at + 1 + k  # head k at position t predicts y[t+1+k]
        ok = tgt_pos < L
        tp = mx.minimum(tgt_pos, L - 1)
        w = m[:, tp] * ok
        ce = nn.losses.cross_entropy(logits[:, :, k], y[:, tp]) * w
        lk = ce.sum() / mx.maximum(w.sum(), 1)
        metrics[f"head{k + 1}"] = lk
        total = total + lk
    return total, metrics


def save_medusa(path: Path, medusa: MedusaHeads) -> Path:
    return save_adapter(path, MEDUSA_STEM, dict(tree_flatten(medusa.parameters())), asdict(medusa.config))


def load_medusa(path: Path, model) -> MedusaHeads:
    """The Medusa heads in folder ``path`` for ``model``, loaded strictly in its dtype."""
    file = Path(path) / f"{MEDUSA_STEM}.json"
    cfg = read_json(file)
    try:
        config = MedusaConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from e
    heads = MedusaHeads(config, model)
    load_adapter_weights(heads, file.with_suffix(".safetensors"), "the base model", model_dtype(model))
    return heads
