"""Model families: every family mlx-lm implements, through its own code (:mod:`.mlxlm`), and
local plugins for the few it lacks (OPT). Chosen by ``config.json``'s ``model_type``."""

from __future__ import annotations

import importlib

import mlx_lm

from . import mlxlm
from .base import check_config, normalize_rope_config
from ..errors import UserError

# model_type -> module under mlx_specstream.models, for families mlx-lm does not implement
LOCAL_TYPES = {"opt": "opt"}


class UnsupportedModelError(UserError):
    pass


def build_model(config: dict):
    """The model for ``config`` (weights not loaded): a local plugin, else mlx-lm's class under
    the tree protocol; a clear error for a family neither has."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModelError(f"config.json has no model_type (got {model_type!r})")
    config = normalize_rope_config(config)
    check_config(config)
    if model_type in LOCAL_TYPES:
        module = importlib.import_module(f"{__name__}.{LOCAL_TYPES[model_type]}")
        return module.Model(module.ModelArgs.from_dict(config))
    if mlxlm.model_class(model_type) is None:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}: mlx-lm {_mlx_lm_version()} does not implement it and there is "
            f"no local plugin ({', '.join(sorted(LOCAL_TYPES))})"
        )
    return mlxlm.build(config)


def _mlx_lm_version() -> str:
    return getattr(mlx_lm, "__version__", "")
