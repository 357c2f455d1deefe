"""A decode setting: what a drafter verifies each step by default (tree, context drafts, τ) and
where it was tuned. One frozen type for greedy decoding's setting and sampling's, read from and
written to a stream config through it (``bench tune --write``), never patched field by field."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

from .errors import UserError
from .tree import AUTO_SPECS, MAX_LOOKUP, Path, normalize_paths

Tree = Union[Tuple[Path, ...], str]  # rank paths, or AUTO_SPECS (sized every step)


def check_lookup_tau(where: str, lookup, tau) -> None:
    """The bounds of a setting's context drafts and τ, wherever they come from (config, CLI)."""
    if not isinstance(lookup, int) or isinstance(lookup, bool) or not 0 <= lookup <= MAX_LOOKUP:
        raise UserError(f"{where}lookup must be in [0, {MAX_LOOKUP}], got {lookup!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau < 1.0:
        raise UserError(f"{where}prune_threshold must be in [0, 1), got {tau!r}")


@dataclass(frozen=True)
class DecodeSetting:
    tree: Tree = ()  # rank paths, root excluded; or "auto" / "auto:context"
    lookup: int = 0  # context drafts (prompt lookup) per step
    prune_threshold: float = 0.0  # τ; 0: no parallel tree pruning
    tuned_on: Optional[dict] = None  # backend, device and BLAS `bench tune` fitted it on
    temp: Optional[float] = None  # the temperature it was tuned for; None: greedy decoding

    def __post_init__(self):  # one spelling per tree: normalized rank paths, root excluded
        if not isinstance(self.tree, str):
            object.__setattr__(self, "tree", normalize_paths(self.tree)[1:])

    @property
    def auto(self) -> Optional[str]:
        """``auto`` or ``auto:context`` when every step's tree is sized, else None."""
        return self.tree if isinstance(self.tree, str) else None

    @property
    def paths(self) -> Tuple[Path, ...]:
        return () if self.auto else self.tree

    @property
    def drafts_nothing(self) -> bool:
        """No drafter node and no context draft: plain decoding (the one place that says so)."""
        return not self.auto and not self.tree and not self.lookup

    def replace(self, **changes) -> "DecodeSetting":
        return replace(self, **changes)

    @classmethod
    def from_json(cls, d: dict, *, where: str = "", depth: int) -> "DecodeSetting":
        """A stream config's ``sampled`` object (or greedy's fields), checked: a named error."""
        if not isinstance(d, dict):
            raise UserError(f"{where.rstrip('.')} must be an object, got {d!r}")
        keys = {"temp", "tree", "lookup", "prune_threshold", "tuned_on"}
        if set(d) - keys or not {"tree", "lookup"} <= set(d):
            raise UserError(f"{where.rstrip('.')}: needs tree and lookup, may hold {sorted(keys)}; got {sorted(d)}")
        tree = d["tree"]
        if isinstance(tree, str):
            if tree not in AUTO_SPECS:
                raise UserError(f"{where}tree must be rank paths or one of {AUTO_SPECS}, got {tree!r}")
        else:
            try:
                tree = normalize_paths(tree)[1:]
            except (TypeError, ValueError) as e:
                raise UserError(f"{where}tree: not a list of rank paths: {e}") from None
            if max((len(p) for p in tree), default=0) > depth:
                raise UserError(f"{where}tree is deeper than the {depth} levels the streams draft")
        lookup, tau, temp = d["lookup"], d.get("prune_threshold", 0.0), d.get("temp")
        check_lookup_tau(where, lookup, tau)
        if temp is not None and (isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0):
            raise UserError(f"{where}temp must be > 0 (it is the temperature tuned for), got {temp!r}")
        tuned = d.get("tuned_on")
        if tuned is not None and not isinstance(tuned, dict):
            raise UserError(f"{where}tuned_on must be an object, got {tuned!r}")
        return cls(tree, lookup, float(tau), tuned, None if temp is None else float(temp))

    def to_json(self) -> dict:
        out = {
            "tree": self.tree if self.auto else [list(p) for p in self.tree],
            "lookup": self.lookup,
            "prune_threshold": self.prune_threshold,
            "tuned_on": self.tuned_on,
        }
        return out if self.temp is None else {"temp": self.temp, **out}


PLAIN = DecodeSetting()  # nothing drafted
