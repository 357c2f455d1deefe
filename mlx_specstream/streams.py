"""Speculative-stream parameters, the multi-stream-attention (MSA) forward, and stream files.

The base model is never modified: stream parameters live in :class:`SpeculativeStreams` and the
MSA forward calls the base model's own layers with the masks of DESIGN.md §1:

- main token ``t``: the cached prefix and its tree ancestors (itself included); in *shared* mode
  with ``main_sees_streams`` also its own streams ``(t, 1..γ)``;
- stream ``(t, j)``: the cached prefix, the ancestors of ``t`` (and ``t``), and ``(t, 1..j)``.

Only main rows are ever written to the KV cache.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import KVCache
from .tree import normalize_paths, sparse

STREAMS_CONFIG = "speculative_streams.json"
STREAMS_WEIGHTS = "speculative_streams.safetensors"
MODES = ("lossless", "shared")
POSITION_POLICIES = ("parent", "parent_plus_j")


@dataclass
class StreamConfig:
    num_streams: int = 3  # γ: tokens drafted per step
    num_msa_layers: int = 2  # Ns: top layers carrying streams
    mode: str = "lossless"  # lossless: base frozen, stream-only LoRA | shared: streams change the model
    main_sees_streams: bool = False  # shared mode only: main row t also attends (t, 1..γ)
    stream_positions: str = "parent"  # RoPE position of (t, j): parent's, or parent's + j
    tree: Optional[List[List[int]]] = None  # rank paths; None: a sparse default tree
    tree_budget: int = 12  # non-root nodes of the default sparse tree
    prune_threshold: float = 0.0  # τ; 0 disables parallel tree pruning
    pruning_rank: int = 8
    lora_rank: int = 8  # LoRA in the MSA layers: stream rows only (lossless) or every row (shared); 0 = none
    lora_scale: float = 1.0
    lora_targets: Optional[List[str]] = None  # paths inside a layer; None = every Linear
    lookup: int = 0  # context drafts (prompt lookup) added to every tree; 0 = off

    def __post_init__(self):
        if self.num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {self.num_streams}")
        if self.num_msa_layers < 1:
            raise ValueError(f"num_msa_layers must be >= 1, got {self.num_msa_layers}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.main_sees_streams and self.mode != "shared":
            raise ValueError("main_sees_streams is only possible in shared mode (lossless main rows never see streams)")
        if self.stream_positions not in POSITION_POLICIES:
            raise ValueError(f"stream_positions must be one of {POSITION_POLICIES}")
        if self.lookup < 0:
            raise ValueError(f"lookup must be >= 0, got {self.lookup}")
        if not 0.0 <= self.prune_threshold < 1.0:
            raise ValueError(f"prune_threshold must be in [0, 1), got {self.prune_threshold}")
        if self.tree is not None:
            paths = normalize_paths(self.tree)
            deepest = max(len(p) for p in paths)
            if deepest > self.num_streams:
                raise ValueError(f"tree depth {deepest} exceeds num_streams {self.num_streams}")
            self.tree = [list(p) for p in paths[1:]]

    @property
    def tree_paths(self) -> Tuple[Tuple[int, ...], ...]:
        if self.tree is not None:
            return tuple(tuple(p) for p in self.tree)
        return sparse(self.num_streams, self.tree_budget)

    @classmethod
    def from_dict(cls, d: dict) -> "StreamConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown stream config keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


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
        # ``scale``: a number, or (R, 1) per-row scales that are 0 on main rows (exact base rows).
        return self.base(x) + self.adapter(x) * self.scale


def _linear_shape(m) -> Tuple[int, int]:
    if isinstance(m, nn.QuantizedLinear):
        return m.weight.shape[1] * 32 // m.bits, m.weight.shape[0]
    return m.weight.shape[1], m.weight.shape[0]


def _linears(layer: nn.Module, targets: Optional[Sequence[str]]) -> Dict[str, nn.Module]:
    found = {n: m for n, m in layer.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    if targets is None:
        return found
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"lora_targets {missing} are not linear layers of this model ({sorted(found)})")
    return {t: found[t] for t in targets}


class PruningAdapter(nn.Module):
    """Rank-8 adapter for early-exit logits at the insertion layer: ``H + B·A·H``."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.up.weight = mx.zeros_like(self.up.weight)

    def __call__(self, h):
        return h + self.up(self.down(h))


class SpeculativeStreams(nn.Module):
    """The stream parameters: ``P`` (γ×h), the pruning adapter and (lossless) stream-only LoRA."""

    def __init__(self, config: StreamConfig, model: nn.Module):
        super().__init__()
        n_layers = len(model.layers)
        if config.num_msa_layers > n_layers:
            raise ValueError(f"num_msa_layers {config.num_msa_layers} exceeds the model's {n_layers} layers")
        self.config = config
        h = model.args.hidden_size
        self.stream_embeddings = mx.random.normal((config.num_streams, h)) * 0.02
        self.pruning = PruningAdapter(h, config.pruning_rank)
        if config.lora_rank:
            self.lora = []
            for layer in model.layers[n_layers - config.num_msa_layers :]:
                adapters = {}
                for name, m in _linears(layer, config.lora_targets).items():
                    d_in, d_out = _linear_shape(m)
                    adapters[name.replace(".", "__")] = LoRAAdapter(d_in, d_out, config.lora_rank)
                self.lora.append(adapters)

    @property
    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def expected_num_params(self, model) -> int:
        """``γ·h + 2·r·h`` (r = pruning rank, 8 → 16·h) plus Σ rank·(in+out) of stream LoRA."""
        c, h = self.config, model.args.hidden_size
        n = c.num_streams * h + 2 * c.pruning_rank * h
        if c.lora_rank:
            for layer in model.layers[len(model.layers) - c.num_msa_layers :]:
                for m in _linears(layer, c.lora_targets).values():
                    d_in, d_out = _linear_shape(m)
                    n += c.lora_rank * (d_in + d_out)
        return n

    @property
    def changes_main(self) -> bool:
        """Whether main-stream outputs differ from the base model's (shared mode with LoRA or
        with main rows seeing streams): then plain decoding must run the stream forward too."""
        c = self.config
        return c.main_sees_streams or (c.mode == "shared" and c.lora_rank > 0)

    def fuse_lora(self, model) -> None:
        """Shared mode: merge the LoRA into the base model's MSA-layer weights (in place) and drop
        it from the streams. Float weights only."""
        if self.config.mode != "shared" or not self.config.lora_rank:
            raise ValueError("only shared-mode LoRA can be fused into the base")
        n = len(model.layers)
        for i, layer in enumerate(model.layers[n - self.config.num_msa_layers :]):
            for key, ad in self.lora[i].items():
                node = layer
                *parents, leaf = key.split("__")
                for p in parents:
                    node = getattr(node, p)
                lin = getattr(node, leaf)
                if not isinstance(lin, nn.Linear):
                    raise ValueError("cannot fuse LoRA into a quantized layer; fuse before quantizing")
                delta = (self.config.lora_scale * (ad.lora_a @ ad.lora_b)).T
                lin.weight = (lin.weight + delta.astype(lin.weight.dtype))
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


# ---------------------------------------------------------------- masks and the MSA forward


def msa_mask(anc: mx.array, owners: mx.array, num_streams: int, main_sees_streams: bool) -> mx.array:
    """Boolean (R, R) mask over rows ``[main (T) ; streams (K·γ)]``, stream rows owner-major.

    ``anc`` (T, T): main-to-main visibility (a causal mask for whole sequences, the ancestor mask
    for a tree). ``owners`` (K,): the main rows that carry streams. Example, T=2 causal, streams on
    row 1, γ=2 (rows: m0, m1, s(1,1), s(1,2))::

        m0     1 0 0 0
        m1     1 1 0 0        (1 1 1 1 with main_sees_streams)
        s(1,1) 1 1 1 0
        s(1,2) 1 1 1 1
    """
    T, K, g = anc.shape[0], owners.shape[0], num_streams
    owner_of = mx.repeat(owners, g)  # (Kγ,)
    j = mx.tile(mx.arange(g), K)  # (Kγ,)
    same_owner = owner_of[:, None] == owner_of[None, :]
    s2s = same_owner & (j[None, :] <= j[:, None])
    s2m = anc[owner_of]
    if main_sees_streams:
        m2s = mx.arange(T)[:, None] == owner_of[None, :]
    else:
        m2s = mx.zeros((T, K * g), dtype=mx.bool_)
    top = mx.concatenate([anc, m2s], axis=1)
    bottom = mx.concatenate([s2m, s2s], axis=1)
    return mx.concatenate([top, bottom], axis=0)


def stream_positions(pos_main: mx.array, owners: mx.array, num_streams: int, policy: str) -> mx.array:
    pos = mx.repeat(pos_main[owners], num_streams)
    if policy == "parent_plus_j":
        pos = pos + mx.tile(mx.arange(1, num_streams + 1), owners.shape[0])
    return pos


def insert_streams(streams: SpeculativeStreams, h: mx.array, owners: mx.array,
                   num_streams: Optional[int] = None) -> mx.array:
    """(B, T, h) main hidden states -> (B, K·γ, h) stream states ``H_t + P_j``, owner-major
    (the first ``num_streams`` streams only, when given)."""
    B, _, d = h.shape
    P = streams.stream_embeddings[:num_streams] if num_streams else streams.stream_embeddings
    s = h[:, owners][:, :, None, :] + P[None, None].astype(h.dtype)
    return s.reshape(B, -1, d)


class _MainRowsCache:
    """A joint main+stream call: cache only the first n (main) rows; stream K/V live for this
    forward only."""

    def __init__(self, cache: KVCache, n_main: int):
        self.cache, self.n, self.offset = cache, n_main, cache.offset

    def update_and_fetch(self, k, v):
        ck, cv = self.cache.update_and_fetch(k[:, :, : self.n], v[:, :, : self.n])
        return (mx.concatenate([ck, k[:, :, self.n :]], axis=2),
                mx.concatenate([cv, v[:, :, self.n :]], axis=2))


def _with_prefix(mask: mx.array, prefix: int) -> mx.array:
    if not prefix:
        return mask
    return mx.concatenate([mx.ones((mask.shape[0], prefix), dtype=mx.bool_), mask], axis=1)


def msa_forward(
    model: nn.Module,
    streams: SpeculativeStreams,
    h_main: mx.array,
    *,
    anc: mx.array,
    owners: mx.array,
    positions: mx.array,
    caches: Optional[List[KVCache]] = None,
    full_mask: Optional[mx.array] = None,
    num_streams: Optional[int] = None,
) -> Tuple[mx.array, mx.array]:
    """Insert streams on ``owners`` and run the top Ns layers. Returns hidden states (before the
    final norm) of main rows (B, T, h) and stream rows (B, K·γ, h).

    ``caches``: the MSA layers' caches (decode: the prefix is cached and this step's main rows
    are appended); ``None`` for whole sequences (training), using transient caches.
    ``full_mask``: :func:`msa_mask` of (anc, owners), when the caller has it precomputed.
    ``num_streams``: run only the first streams (stream j attends to streams ≤ j only, so the
    first g streams are exactly what all γ would give them): a tree drafting g levels needs no more.
    """
    c = streams.config
    g = num_streams or c.num_streams
    layers = model.layers[len(model.layers) - c.num_msa_layers :]
    caches = caches if caches is not None else [KVCache() for _ in layers]
    prefix = caches[0].offset
    T = h_main.shape[1]
    full = full_mask if full_mask is not None else msa_mask(anc, owners, g, c.main_sees_streams)
    pos_s = stream_positions(positions, owners, g, c.stream_positions)
    h_str = insert_streams(streams, h_main, owners, g)
    joint_mask = _with_prefix(full, prefix)[None, None]  # shaped for attention once, not per layer
    pos_joint = mx.concatenate([positions, pos_s])
    # One call per layer over [main ; streams] rows, caching main rows only. The mask keeps main
    # rows off the streams (unless main_sees_streams); in lossless mode the LoRA views touch stream
    # rows only, so main rows are exactly the base model's.
    x = mx.concatenate([h_main, h_str], axis=1)
    row_scale = None
    if c.mode == "lossless" and c.lora_rank:
        row_scale = (mx.arange(x.shape[1]) >= T).astype(x.dtype)[:, None] * c.lora_scale
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        x = streams.stream_layer(layer, i, row_scale)(x, joint_mask, _MainRowsCache(cache, T), pos_joint)
    h_main, h_str = x[:, :T], x[:, T:]
    return h_main, h_str


def bottom_forward(model, streams, tokens, *, mask, positions, caches=None) -> mx.array:
    """Embeddings and the bottom N−Ns layers (main rows only)."""
    n_bottom = len(model.layers) - streams.config.num_msa_layers
    h = model.embed(tokens, cache=caches, positions=positions)
    for i, layer in enumerate(model.layers[:n_bottom]):
        h = layer(h, mask, caches[i] if caches else None, positions)
    return h


def main_forward(model, streams, tokens, cache, *, mask="causal") -> mx.array:
    """Main rows only (no streams attached), e.g. prompt prefill: base layers, except that in
    shared mode the MSA layers carry their (shared) LoRA. Returns the last hidden states."""
    n_bottom = len(model.layers) - streams.config.num_msa_layers
    h = model.embed(tokens, cache=cache)
    for i, layer in enumerate(model.layers):
        if i >= n_bottom and streams.config.mode == "shared":
            layer = streams.stream_layer(layer, i - n_bottom)
        h = layer(h, mask if tokens.shape[1] > 1 else None, cache[i] if cache else None, None)
    return h


def early_exit_logits(model, streams, h: mx.array) -> mx.array:
    return model.head(model.final_norm(streams.pruning(h)))


def forward_with_streams(
    model, streams, tokens: mx.array, owners: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array]:
    """Training-shaped forward over whole sequences (B, L): main logits (B, L, V) and stream
    logits (B, K, γ, V) for streams on ``owners`` (default: every position)."""
    L = tokens.shape[1]
    positions = mx.arange(L)
    owners = mx.arange(L) if owners is None else owners
    h = bottom_forward(model, streams, tokens, mask="causal" if L > 1 else None, positions=positions)
    anc = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    h_main, h_str = msa_forward(model, streams, h, anc=anc, owners=owners, positions=positions)
    main = model.head(model.final_norm(h_main))
    strm = model.head(model.final_norm(h_str))
    B = tokens.shape[0]
    return main, strm.reshape(B, owners.shape[0], streams.config.num_streams, -1)


# ---------------------------------------------------------------- stream files


def save_streams(path: Path, streams: SpeculativeStreams, name: Optional[str] = None) -> Path:
    """Write ``speculative_streams[-name].json/.safetensors`` next to a base checkpoint."""
    path = Path(path)
    stem = "speculative_streams" + (f"-{name}" if name else "")
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) if v.dtype == mx.float32 else v
               for k, v in tree_flatten(streams.parameters())}
    mx.save_safetensors(str(path / f"{stem}.safetensors"), weights, metadata={"format": "mlx"})
    (path / f"{stem}.json").write_text(json.dumps(streams.config.to_dict(), indent=2) + "\n")
    return path / f"{stem}.json"


def model_dtype(model) -> mx.Dtype:
    """The model's float dtype (a quantized model's scales tell it); streams run in it."""
    for _, v in tree_flatten(model.parameters()):
        if v.dtype in (mx.float32, mx.float16, mx.bfloat16):
            return v.dtype
    return mx.float16


def find_stream_file(model_path: Path, streams: Optional[str]) -> Optional[Path]:
    """``streams``: None (the default ``speculative_streams.json`` if present), a name (``-name``
    variant next to the base), or a path to a ``.json`` stream config."""
    if streams is None:
        p = model_path / STREAMS_CONFIG
        return p if p.exists() else None
    p = Path(streams)
    if p.suffix == ".json" and p.exists():
        return p
    if p.is_dir() and (p / STREAMS_CONFIG).exists():
        return p / STREAMS_CONFIG
    q = model_path / f"speculative_streams-{streams}.json"
    if q.exists():
        return q
    available = sorted(x.name for x in model_path.glob("speculative_streams*.json"))
    raise FileNotFoundError(f"stream file {streams!r} not found (in {model_path}: {available or 'none'})")


def load_streams(config_file: Path, model, **overrides) -> SpeculativeStreams:
    from .utils import CheckpointError, load_safetensors

    config_file = Path(config_file)
    try:
        cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = StreamConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    streams = SpeculativeStreams(config, model)
    wfile = config_file.with_suffix(".safetensors")
    if not wfile.exists():
        raise CheckpointError(f"{wfile} not found (stream config without its weights)")
    weights = load_safetensors(wfile)
    expected = dict(tree_flatten(streams.parameters()))
    problems = sorted(set(expected) ^ set(weights)) + [
        f"{k}: {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        raise CheckpointError(f"{wfile} does not match {config_file.name} and the base model: {problems[:8]}")
    dtype = model_dtype(model)
    streams.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
    mx.eval(streams.parameters())
    return streams


class DraftedModel(nn.Module):
    """A base model plus a drafter: forwards the family seams (args, layers, embed, final_norm,
    head) and the plain forward to the base, which is shared, never copied."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    @property
    def args(self):
        return self.base.args

    @property
    def layers(self):
        return self.base.layers

    def embed(self, *a, **kw):
        return self.base.embed(*a, **kw)

    def final_norm(self, h):
        return self.base.final_norm(h)

    def head(self, h):
        return self.base.head(h)

    def __call__(self, inputs, cache=None, *, mask=None, positions=None):
        return self.base(inputs, cache, mask=mask, positions=positions)


class SpecStreamModel(DraftedModel):
    """A base model with a stream adapter attached. Swap stream files with :meth:`set_streams`
    without reloading the base (per-task adapters)."""

    def __init__(self, base: nn.Module, streams: SpeculativeStreams):
        super().__init__(base)
        self.streams = streams

    def set_streams(self, streams: SpeculativeStreams) -> None:
        self.streams = streams

    @property
    def main_depends_on_streams(self) -> bool:
        return self.streams.changes_main

    def __call__(self, inputs, cache=None, *, mask=None, positions=None):
        """Main-stream logits. Exactly the base model's unless main rows see streams, in which
        case the one-node-per-step stream forward is the model (see ``speculative``)."""
        if self.main_depends_on_streams:
            raise ValueError("this model's main stream attends to its streams: decode it with "
                             "stream_generate (speculative or not), not a plain forward")
        return self.base(inputs, cache, mask=mask, positions=positions)
