"""The stream config: every Speculative Streaming setting and its default, declared once."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, fields
from typing import List, Optional

from ..tree import MAX_LOOKUP, MAX_TREE_NODES, TreeSetting, normalize_paths
from ..errors import UserError

MODES = ("lossless", "shared")
POSITION_POLICIES = ("parent", "parent_plus_j")


def check_setting(where: str, lookup, tau) -> None:
    """The bounds of a decode setting's context drafts and τ (greedy's fields and `sampled`'s)."""
    if not isinstance(lookup, int) or isinstance(lookup, bool) or not 0 <= lookup <= MAX_LOOKUP:
        raise UserError(f"{where}lookup must be in [0, {MAX_LOOKUP}], got {lookup!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau < 1.0:
        raise UserError(f"{where}prune_threshold must be in [0, 1), got {tau!r}")


@dataclass
class StreamConfig(TreeSetting):
    num_streams: int = 3  # γ: tokens drafted per step
    num_msa_layers: int = 2  # Ns: top layers carrying streams
    mode: str = "lossless"  # lossless: base frozen, stream-only LoRA | shared: streams change the model
    main_sees_streams: bool = False  # shared mode only: main row t also attends (t, 1..γ)
    stream_positions: str = "parent"  # RoPE position of (t, j): parent's, or parent's + j
    prune_threshold: float = 0.0  # τ; 0 disables parallel tree pruning
    pruning_rank: int = 8
    lora_rank: int = 8  # LoRA in the MSA layers: stream rows only (lossless) or every row (shared); 0 = none
    lora_scale: float = 1.0
    lora_targets: Optional[List[str]] = None  # paths inside a layer; None = every Linear
    lookup: int = 0  # context drafts (prompt lookup) added to every tree; 0 = off
    # Token-conditioned streams: stream j's state, before the final norm, gets a low-rank MLP of
    # itself and the embedding of the token before its target (the correction token for stream 1,
    # stream j-1's draft after). 0: the paper's independent streams.
    token_head_rank: int = 0
    # At decode, the conditioned scores of the tokens the unconditioned stream ranks first (this
    # many; the LM head's rows gathered): no second full-vocabulary pass. 0: the whole vocabulary.
    token_head_topk: int = 64
    tuned_on: Optional[dict] = None  # backend, device, BLAS that `bench tune` fitted tree/lookup/τ on
    # The setting `bench tune --temp T` fitted for sampled decoding, used whenever temp > 0 (sampled
    # drafts are accepted less often, so greedy's tree can lose to plain decoding there):
    # {"temp", "tree", "lookup", "prune_threshold", "tuned_on"}; tree [] with lookup 0 = plain decoding.
    sampled: Optional[dict] = None
    base: Optional[dict] = None  # fingerprint of the base it was trained on (checkpoint.base_fingerprint)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(f.type))
            if want is not None and (not isinstance(v, want) or (want is not bool and isinstance(v, bool))):
                raise UserError(f"{f.name} must be {str(f.type)}, got {v!r}")
        for name in ("tuned_on", "base", "sampled"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise UserError(f"{name} must be an object, got {getattr(self, name)!r}")
        if self.num_streams < 1:
            raise UserError(f"num_streams must be >= 1, got {self.num_streams}")
        if self.num_msa_layers < 1:
            raise UserError(f"num_msa_layers must be >= 1, got {self.num_msa_layers}")
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.main_sees_streams and self.mode != "shared":
            raise UserError("main_sees_streams is only possible in shared mode (lossless main rows never see streams)")
        if self.stream_positions not in POSITION_POLICIES:
            raise UserError(f"stream_positions must be one of {POSITION_POLICIES}")
        check_setting("", self.lookup, self.prune_threshold)
        for name, lo, hi in (("num_streams", 1, 64), ("num_msa_layers", 1, 1024), ("tree_budget", 1, MAX_TREE_NODES),
                             ("pruning_rank", 1, 4096), ("lora_rank", 0, 4096), ("token_head_rank", 0, 4096),
                             ("token_head_topk", 0, 1 << 16)):
            if not lo <= getattr(self, name) <= hi:
                raise UserError(f"{name} {getattr(self, name)} is out of range ({lo}..{hi})")
        if not (isinstance(self.lora_scale, (int, float)) and math.isfinite(self.lora_scale)):
            raise UserError(f"lora_scale must be a finite number, got {self.lora_scale!r}")
        if self.lora_targets is not None and not (isinstance(self.lora_targets, list) and self.lora_targets
                                                  and all(isinstance(t, str) and t for t in self.lora_targets)):
            raise UserError(f"lora_targets must be a non-empty list of layer paths (strings), got {self.lora_targets!r}")
        self.check_tree()
        if self.sampled is not None:
            self.sampled = self.check_sampled(self.sampled)

    def check_sampled(self, s: dict) -> dict:
        keys = {"temp", "tree", "lookup", "prune_threshold", "tuned_on"}
        if set(s) - keys or not {"tree", "lookup"} <= set(s):
            raise UserError(f"sampled: needs tree and lookup, may hold {sorted(keys)}; got {sorted(s)}")
        try:
            paths = normalize_paths(s["tree"])[1:]
        except (TypeError, ValueError) as e:
            raise UserError(f"sampled.tree: not a list of rank paths: {e}") from None
        if max((len(p) for p in paths), default=0) > self.num_streams:
            raise UserError(f"sampled.tree is deeper than the {self.num_streams} levels the streams draft")
        lookup, tau, temp = s["lookup"], s.get("prune_threshold", 0.0), s.get("temp", 1.0)
        check_setting("sampled.", lookup, tau)
        if not isinstance(temp, (int, float)) or temp <= 0:
            raise UserError(f"sampled.temp must be > 0 (it is the temperature tuned for), got {temp!r}")
        return {**s, "tree": [list(p) for p in paths], "prune_threshold": float(tau)}

    @property
    def sampled_setting(self) -> Optional[tuple]:
        """(rank paths, lookup, τ) for sampled decoding, or None when none was tuned."""
        s = self.sampled
        return None if s is None else (tuple(tuple(p) for p in s["tree"]), s["lookup"], s["prune_threshold"])

    @property
    def draft_depth(self) -> int:
        return self.num_streams

    @property
    def changes_main(self) -> bool:
        """Whether main-stream outputs differ from the base model's (shared mode with LoRA or
        with main rows seeing streams): then even plain decoding runs the stream forward."""
        return self.main_sees_streams or (self.mode == "shared" and self.lora_rank > 0)

    @classmethod
    def from_dict(cls, d: dict) -> "StreamConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown stream config keys {unknown}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)
