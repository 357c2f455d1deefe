import json

import mlx.core as mx
import numpy as np
import pytest

from hf_models import CONFIGS, VOCAB
from mlx_specstream.cache import make_cache
from mlx_specstream.models import LOCAL_TYPES, UnsupportedModelError, build_model
from mlx_specstream.models.base import normalize_rope_config
from mlx_specstream.checkpoint import load_model


def _ids(n, seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, size=(1, n))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(hf_model, name):
    import torch

    path, hf = hf_model(name)
    ids = _ids(41)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(path)
    out = np.array(model(mx.array(ids)))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_checkpoint_loads_close(hf_model, name):
    import torch

    path, hf = hf_model(name, dtype=torch.bfloat16)
    ids = _ids(17)
    with torch.no_grad():
        ref = hf.float()(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(path, dtype=mx.float32)
    np.testing.assert_allclose(np.array(model(mx.array(ids))), ref, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_incremental_equals_full(hf_model, name):
    path, _ = hf_model(name)
    model, _ = load_model(path)
    ids = mx.array(_ids(30, seed=1))
    full = model(ids)
    cache = make_cache(model)
    pieces = [model(ids[:, :13], cache=cache)]  # chunked prefill, then one token at a time
    for i in range(13, 30):
        pieces.append(model(ids[:, i : i + 1], cache=cache))
    inc = mx.concatenate(pieces, axis=1)
    np.testing.assert_allclose(np.array(inc), np.array(full), atol=1e-5, rtol=1e-4)
    assert cache[0].offset == 30


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_explicit_positions_and_mask_equal_causal_path(hf_model, name):
    """Per-token positions + a boolean mask describing plain causal attention give the same
    logits as the fast path — and a tree-like layout (sibling tokens) agrees with separate runs."""
    path, _ = hf_model(name)
    model, _ = load_model(path)
    ids = mx.array(_ids(20, seed=2))
    prefix, rest = ids[:, :12], ids[:, 12:]
    cache = make_cache(model)
    model(prefix, cache=cache)
    ref = model(rest, cache=make_cache(model) and _prefilled(model, prefix))
    L, S = rest.shape[1], 12 + rest.shape[1]
    mask = mx.arange(S)[None, :] <= (mx.arange(L)[:, None] + 12)
    out = model(rest, cache=cache, mask=mask, positions=mx.arange(12, 12 + L))
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-5, rtol=1e-4)

    # Two siblings a, b at the same depth after the prefix: each sees the prefix and itself only.
    a, b = ids[:, 12:13], ids[:, 13:14]
    c1 = _prefilled(model, prefix)
    sib = model(
        mx.concatenate([a, b], axis=1),
        cache=c1,
        mask=mx.array([[True] * 12 + [True, False], [True] * 12 + [False, True]]),
        positions=mx.array([12, 12]),
    )
    ra = model(a, cache=_prefilled(model, prefix))
    rb = model(b, cache=_prefilled(model, prefix))
    np.testing.assert_allclose(np.array(sib[:, 0]), np.array(ra[:, 0]), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.array(sib[:, 1]), np.array(rb[:, 0]), atol=1e-5, rtol=1e-4)


def _prefilled(model, prefix):
    cache = make_cache(model)
    model(prefix, cache=cache)
    return cache


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        build_model({"model_type": "no_such_family", "hidden_size": 8})
    for t in LOCAL_TYPES:
        assert t in str(e.value)


def test_rope_parameters_and_old_keys_load_the_same(hf_model, tmp_path):
    """transformers-5 ``rope_parameters`` and the older top-level keys describe one model."""
    import shutil

    path, _ = hf_model("llama3_tied_headdim")
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in cfg
    old = dict(cfg)
    rp = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rp.pop("rope_theta")
    old["rope_scaling"] = rp
    shutil.copytree(path, tmp_path / "old")
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    a, _ = load_model(path)
    b, _ = load_model(tmp_path / "old")
    ids = mx.array(_ids(9))
    np.testing.assert_array_equal(np.array(a(ids)), np.array(b(ids)))


def test_normalize_rope_config_partial_rotary():
    cfg = normalize_rope_config(
        {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.4, "rope_type": "default"}}
    )
    assert cfg["rope_theta"] == 1e4 and cfg["partial_rotary_factor"] == 0.4
    assert cfg.get("rope_scaling") is None
