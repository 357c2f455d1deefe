"""Model families as plugins, chosen by ``config.json``'s ``model_type``."""

from __future__ import annotations

import importlib

from .base import normalize_rope_config
from ..errors import UserError

# model_type -> module under mlx_specstream.models
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "opt": "opt",
    "phi": "phi",
}


class UnsupportedModelError(UserError):
    pass


def get_model_classes(config: dict):
    """(Model, ModelArgs) for ``config['model_type']``; a clear error for unknown families."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    module = importlib.import_module(f"{__name__}.{MODEL_TYPES[model_type]}")
    return module.Model, module.ModelArgs


def build_model(config: dict):
    Model, ModelArgs = get_model_classes(config)
    return Model(ModelArgs.from_dict(normalize_rope_config(config)))
