"""The stream config: every Speculative Streaming setting and its default, declared once."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, fields, replace
from typing import List, Optional

from ..errors import UserError
from ..setting import DecodeSetting, check_lookup_tau
from ..tree import MAX_TREE_NODES, TreeSetting

MODES = ("lossless", "shared")
POSITION_POLICIES = ("parent", "parent_plus_j")
TOKEN_HEAD_SPACES = ("normed", "residual")


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
    # Token-conditioned streams: stream j's state gets a low-rank MLP of itself and the embedding
    # of the token before its target (the correction token for stream 1, stream j-1's draft after).
    # 0: the paper's independent streams.
    token_head_rank: int = 0
    # Where the head adds: "normed" (the final norm's output) or "residual" (before it; files
    # written before this field, see TokenHead).
    token_head_space: str = "normed"
    # At decode, the conditioned scores of the tokens the unconditioned stream ranks first (this
    # many; the LM head's rows gathered): no second full-vocabulary pass. 0: the whole vocabulary.
    token_head_topk: int = 64
    # Drafts over the training data's N most frequent target tokens (their ranking is stored in the
    # adapter file as ``draft_vocab``): stream rows read N rows of the LM head instead of all V
    # (FR-Spec; EAGLE-3's reduced draft vocabulary). Lossless: the target still verifies over V.
    # 0: the whole vocabulary.
    draft_vocab: int = 0
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
        if self.token_head_space not in TOKEN_HEAD_SPACES:
            raise UserError(f"token_head_space must be one of {TOKEN_HEAD_SPACES}, got {self.token_head_space!r}")
        if self.stream_positions not in POSITION_POLICIES:
            raise UserError(f"stream_positions must be one of {POSITION_POLICIES}")
        check_lookup_tau("", self.lookup, self.prune_threshold)
        for name, lo, hi in (
            ("num_streams", 1, 64),
            ("num_msa_layers", 1, 1024),
            ("tree_budget", 1, MAX_TREE_NODES),
            ("pruning_rank", 1, 4096),
            ("lora_rank", 0, 4096),
            ("token_head_rank", 0, 4096),
            ("token_head_topk", 0, 1 << 16),
            ("draft_vocab", 0, 1 << 24),
        ):
            if not lo <= getattr(self, name) <= hi:
                raise UserError(f"{name} {getattr(self, name)} is out of range ({lo}..{hi})")
        if not (isinstance(self.lora_scale, (int, float)) and math.isfinite(self.lora_scale)):
            raise UserError(f"lora_scale must be a finite number, got {self.lora_scale!r}")
        if self.lora_targets is not None and not (
            isinstance(self.lora_targets, list)
            and self.lora_targets
            and all(isinstance(t, str) and t for t in self.lora_targets)
        ):
            raise UserError(
                f"lora_targets must be a non-empty list of layer paths (strings), got {self.lora_targets!r}"
            )
        self.check_tree()
        if self.sampled is not None:
            self.sampled = self.check_sampled(self.sampled)

    def check_sampled(self, s: dict) -> dict:
        setting = DecodeSetting.from_json(s, where="sampled.", depth=self.num_streams)
        if setting.auto:
            raise UserError("sampled.tree must be rank paths (per-step sizing is greedy's setting)")
        return setting.replace(temp=1.0 if setting.temp is None else setting.temp).to_json()

    @property
    def setting(self) -> DecodeSetting:
        """Greedy decoding's setting (the config's flat fields)."""
        return DecodeSetting(self.tree_auto or self.tree_paths, self.lookup, self.prune_threshold, self.tuned_on)

    @property
    def sampled_setting(self) -> Optional[DecodeSetting]:
        """The setting tuned for temp > 0, or None when none was."""
        if self.sampled is None:
            return None
        return DecodeSetting.from_json(self.sampled, where="sampled.", depth=self.num_streams)

    def with_setting(self, setting: DecodeSetting) -> "StreamConfig":
        """This config with ``setting`` as sampling's (``temp`` set) or greedy's."""
        if setting.temp is not None:
            return replace(self, sampled=setting.to_json())
        tree = setting.tree if setting.auto else [list(p) for p in setting.tree]
        return replace(
            self, tree=tree, lookup=setting.lookup, prune_threshold=setting.prune_threshold, tuned_on=setting.tuned_on
        )

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
