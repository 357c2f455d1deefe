"""The Medusa-1 baseline: K extra heads (ResBlock + own vocabulary head) on a frozen base,
decoded through the same tree verifier as Speculative Streaming, so both compare on one base."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import KVCache
from .sample import GreedyAcceptance
from .streams import DraftedModel
from .tree import Tree, build_tree, sparse

MEDUSA_CONFIG = "medusa_heads.json"
MEDUSA_WEIGHTS = "medusa_heads.safetensors"


@dataclass
class MedusaConfig:
    num_heads: int = 3
    tree: Optional[List[List[int]]] = None
    tree_budget: int = 12

    @property
    def tree_paths(self):
        if self.tree is not None:
            return tuple(tuple(p) for p in self.tree)
        return sparse(self.num_heads, self.tree_budget)


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


class MedusaModel(DraftedModel):
    """A base model with Medusa heads attached (the baseline)."""

    def __init__(self, base, medusa: MedusaHeads):
        super().__init__(base)
        self.medusa = medusa


def medusa_generate_step(
    prompt: mx.array, model, medusa: MedusaHeads, *, max_tokens: int, accept: Optional[Callable] = None,
    tree: Optional[Tree] = None, prompt_cache: Optional[List[KVCache]] = None, prefill_step_size: int = 512,
    context: Optional[int] = None, lookup: int = 0, history: Sequence[int] = (),
):
    """Yield one StepResult per forward pass: verify the tree with the base model, draft from the
    heads at the last accepted node (the loop and bookkeeping of Speculative Streaming)."""
    from .speculative import decode_trees, verify_step

    accept = accept or GreedyAcceptance()
    step = lambda t, state, cache, k: verify_step(model, t, state, cache, accept, k, medusa)  # noqa: E731
    return decode_trees(prompt, model, step, lambda toks, cache: model(toks, cache=cache),
                        num_drafts=medusa.config.num_heads, tree=tree or build_tree(medusa.config.tree_paths),
                        max_tokens=max_tokens, prompt_cache=prompt_cache, prefill_step_size=prefill_step_size,
                        context=context, lookup=lookup, history=history)


def medusa_loss(model, medusa: MedusaHeads, tokens: mx.array, mask: mx.array):
    """Σ_k CE(head_k(h_t), y[t+1+k]) over target positions; the base is frozen (no gradient)."""
    x, y, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    L = x.shape[1]
    h = mx.stop_gradient(model.hidden(x))
    logits = medusa(h)  # (B, L, K, V)
    total, metrics = mx.array(0.0), {}
    for k in range(medusa.config.num_heads):
        off = k + 1
        if L - off <= 0:
            break
        ce = nn.losses.cross_entropy(logits[:, : L - off, k], y[:, off:]) * m[:, off:]
        lk = ce.sum() / mx.maximum(m[:, off:].sum(), 1)
        metrics[f"head{k + 1}"] = lk
        total = total + lk
    return total, metrics


def save_medusa(path: Path, medusa: MedusaHeads) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(medusa.parameters())}
    mx.save_safetensors(str(path / MEDUSA_WEIGHTS), weights, metadata={"format": "mlx"})
    (path / MEDUSA_CONFIG).write_text(json.dumps(asdict(medusa.config), indent=2) + "\n")


def load_medusa(path: Path, model) -> MedusaHeads:
    from .utils import CheckpointError, load_safetensors

    path = Path(path)
    try:
        cfg = MedusaConfig(**json.loads((path / MEDUSA_CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path / MEDUSA_CONFIG}: {e}") from e
    heads = MedusaHeads(cfg, model)
    weights = load_safetensors(path / MEDUSA_WEIGHTS)
    expected = dict(tree_flatten(heads.parameters()))
    bad = sorted(set(expected) ^ set(weights)) + [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{path / MEDUSA_WEIGHTS} does not match the base model: {bad[:8]}")
    from .streams import model_dtype

    heads.load_weights([(k, v.astype(model_dtype(model))) for k, v in weights.items()])
    mx.eval(heads.parameters())
    return heads
