"""The stream parameters: stream embeddings ``P`` (γ×h), the pruning adapter and the LoRA of the
Ns MSA layers (stream rows only in lossless mode, every row in shared mode)."""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from .config import StreamConfig
from ..errors import UserError


_KEPT_LORA = (LoRALinear, DoRALinear)  # what mlx-lm's adapter loader wraps a base's linears in


class LoRAAdapter(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.lora_a = mx.random.normal((d_in, rank)) * d_in**-0.5
        self.lora_b = mx.zeros((rank, d_out))

    def __call__(self, x):
        return (x @ self.lora_a) @ self.lora_b


class _LoRALinear(nn.Module):
    """A transient view: the base linear plus an adapter (built per call, never saved)."""

    def __init__(self, base, adapter: LoRAAdapter, scale):
        super().__init__()
        self.base, self.adapter, self.scale = base, adapter, scale

    def __call__(self, x):
        # ``scale``: a number, or (R, 1) per-row scales that are 0 on main rows. Those rows are
        # selected out, not multiplied by 0: 0 x NaN is NaN, and main rows must stay exactly the
        # base's whatever the adapter holds.
        if isinstance(self.scale, mx.array):
            return self.base(x) + mx.where(self.scale != 0, self.adapter(x) * self.scale, 0)
        return self.base(x) + self.adapter(x) * self.scale


def _linear_shape(m) -> Tuple[int, int]:
    if isinstance(m, _KEPT_LORA):
        m = m.linear
    if isinstance(m, nn.QuantizedLinear):
        return m.weight.shape[1] * 32 // m.bits, m.weight.shape[0]
    return m.weight.shape[1], m.weight.shape[0]


def _linears(layer: nn.Module, targets: Optional[Sequence[str]]) -> Dict[str, nn.Module]:
    """The layer's linear maps by path; a kept (unfused) mlx-lm LoRA counts as the linear it wraps,
    at that linear's path, so a stream adapter attaches to a base with or without a kept LoRA."""
    modules = dict(layer.named_modules())
    kept = {n for n, m in modules.items() if isinstance(m, _KEPT_LORA)}
    found = {
        n: m
        for n, m in modules.items()
        if n in kept or (isinstance(m, (nn.Linear, nn.QuantizedLinear)) and n.rsplit(".", 1)[0] not in kept)
    }
    if targets is None:
        return found
    missing = [t for t in targets if t not in found]
    if missing:
        raise UserError(f"lora_targets {missing} are not linear layers of this model ({sorted(found)})")
    return {t: found[t] for t in targets}


class PruningAdapter(nn.Module):
    """Low-rank adapter (rank ``pruning_rank``, 8 by default) for early-exit logits at the insertion layer: ``H + B·A·H``."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.up.weight = mx.zeros_like(self.up.weight)

    def __call__(self, h):
        return h + self.up(self.down(h))


class TokenHead(nn.Module):
    """Conditions a stream's state on the token before its target, ``e`` the base's (frozen)
    embedding of that token: ``x + up(silu(from_state(x) + from_token(e)))`` where ``x`` is the
    final norm's output (``space="normed"``): what the LM head reads. ``space="residual"`` (adapters
    of sessions 10-15) adds it to the state before the final norm instead, where the base's
    residual norms (~1,500 on SmolLM2's top layer against ~3 for an embedding) drown the token's
    term. ``up`` starts at zero, so an untrained head leaves the paper's independent streams."""

    def __init__(self, hidden: int, rank: int, space: str = "normed"):
        super().__init__()
        self.from_state = nn.Linear(hidden, rank, bias=False)
        self.from_token = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.up.weight = mx.zeros_like(self.up.weight)
        self.space = space

    def _delta(self, x: mx.array, e: mx.array) -> mx.array:
        return self.up(nn.silu(self.from_state(x) + self.from_token(e.astype(x.dtype))))

    def __call__(self, s: mx.array, e: mx.array, final_norm) -> mx.array:
        """The LM head's input for stream state ``s`` (before the final norm) given token ``e``."""
        if self.space == "residual":
            return final_norm(s + self._delta(s, e))
        x = final_norm(s)
        return x + self._delta(x, e)


class SpeculativeStreams(nn.Module):
    """The stream parameters: ``P`` (γ×h), the pruning adapter and (lossless) stream-only LoRA."""

    def __init__(self, config: StreamConfig, model: nn.Module):
        super().__init__()
        n_layers = len(model.layers)
        if config.num_msa_layers > n_layers:
            raise UserError(f"num_msa_layers {config.num_msa_layers} exceeds the model's {n_layers} layers")
        self.config = config
        self.source = None  # the stream config file it was loaded from, if any
        # Token ids by how often the training data had them as targets, most frequent first
        # (numpy, not a parameter): the first ``config.draft_vocab`` are what streams draft from.
        self.vocab_ranking: Optional[np.ndarray] = None
        h = model.args.hidden_size
        self.stream_embeddings = mx.random.normal((config.num_streams, h)) * 0.02
        self.pruning = PruningAdapter(h, config.pruning_rank)
        if config.token_head_rank:
            self.token_head = TokenHead(h, config.token_head_rank, config.token_head_space)
        if config.lora_rank:
            self.lora = []
            for layer in model.layers[n_layers - config.num_msa_layers :]:
                adapters = {}
                for name, m in _linears(layer, config.lora_targets).items():
                    d_in, d_out = _linear_shape(m)
                    adapters[name.replace(".", "__")] = LoRAAdapter(d_in, d_out, config.lora_rank)
                self.lora.append(adapters)

    def draft_ids(self) -> Optional[mx.array]:
        """The draft vocabulary (ascending ids) or None for the whole vocabulary."""
        n = self.config.draft_vocab
        if not n:
            return None
        r = self.vocab_ranking
        if r is None or len(r) < n:
            have = "no token ranking" if r is None else f"a ranking of {len(r)} tokens"
            raise UserError(
                f"draft_vocab {n} needs the adapter file to rank at least {n} tokens; it has {have} "
                "(rank them from the training data: python -m mlx_specstream.streams.vocab)"
            )
        return mx.array(np.sort(r[:n]).astype(np.int32))

    @property
    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def expected_num_params(self, model) -> int:
        """``γ·h + 2·r·h`` (r = pruning rank, 8 → 16·h) plus Σ rank·(in+out) of stream LoRA."""
        c, h = self.config, model.args.hidden_size
        n = c.num_streams * h + 2 * c.pruning_rank * h + 3 * c.token_head_rank * h
        if c.lora_rank:
            for layer in model.layers[len(model.layers) - c.num_msa_layers :]:
                for m in _linears(layer, c.lora_targets).values():
                    d_in, d_out = _linear_shape(m)
                    n += c.lora_rank * (d_in + d_out)
        return n

    @property
    def changes_main(self) -> bool:
        return self.config.changes_main

    def fuse_lora(self, model) -> None:
        """Shared mode: merge the LoRA into the base model's MSA-layer weights (in place) and drop
        it from the streams. Float weights only."""
        if self.config.mode != "shared" or not self.config.lora_rank:
            raise UserError("only shared-mode LoRA can be fused into the base")
        n = len(model.layers)
        for i, layer in enumerate(model.layers[n - self.config.num_msa_layers :]):
            for key, ad in self.lora[i].items():
                node = layer
                *parents, leaf = key.split("__")
                for p in parents:
                    node = getattr(node, p)
                lin = getattr(node, leaf)
                if not isinstance(lin, nn.Linear):
                    raise UserError("cannot fuse LoRA into a quantized layer; fuse before quantizing")
                delta = (self.config.lora_scale * (ad.lora_a @ ad.lora_b)).T
                lin.weight = lin.weight + delta.astype(lin.weight.dtype)
        self.config.lora_rank = 0
        del self["lora"]

    def stream_layer(self, layer: nn.Module, i: int, row_scale=None) -> nn.Module:
        """MSA layer ``i`` with its LoRA views, scaled per row by ``row_scale`` ((R, 1), zero on
        main rows in lossless joint calls) or by ``lora_scale`` on every row."""
        if not self.config.lora_rank:
            return layer
        view = copy.copy(layer)
        for key, adapter in self.lora[i].items():
            *parents, leaf = key.split("__")
            node = view
            for p in parents:  # copy the path down to the leaf so the base layer is untouched
                child = copy.copy(getattr(node, p))
                setattr(node, p, child)
                node = child
            scale = self.config.lora_scale if row_scale is None else row_scale
            setattr(node, leaf, _LoRALinear(getattr(node, leaf), adapter, scale))
        return view
