"""Token-conditioned streams: each stream fed the token before its target through a small head.
Lossless decoding stays bit-identical to the base; the conditioned drafts are the head's
(full-vocabulary or re-scored top-K); training reports top-1 accuracy per stream and learns."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_lm_families import tiny_model
from mlx_specstream.decode import generate_step, tree_generate_step
from mlx_specstream.drafters import StreamDrafter
from mlx_specstream.drafters.streams import conditioned_drafts
from mlx_specstream.models.base import head_scores
from mlx_specstream.streams import SpeculativeStreams, StreamConfig
from mlx_specstream.streams.loss import LossWeights, stream_loss
from mlx_specstream.tree import cartesian, chain


def _streams(model, **kw):
    s = SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4, token_head_rank=8, **kw), model)
    mx.random.seed(3)
    s.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, s.parameters()))
    return s


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2_moe"])
@pytest.mark.parametrize("topk", [0, 16])
def test_lossless_token_conditioned_streams_decode_exactly_the_base(name, topk):
    model = tiny_model(name)
    prompt = mx.array(np.random.RandomState(1).randint(3, 250, size=14))
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=30)]
    s = _streams(model, token_head_topk=topk)
    for tree in (cartesian(3, 2), chain(3)):
        out = []
        for r in tree_generate_step(
            prompt, model, StreamDrafter(s), max_tokens=30, tree=[list(p) for p in tree], lookup=2
        ):
            out += r.tokens
        assert out[:30] == ref


def test_conditioned_drafts_follow_the_chain_and_head_scores_equal_a_head_pass():
    model = tiny_model("granite")  # a family with a logit transform (scaling)
    s = _streams(model, token_head_topk=0)
    states = mx.random.normal((3, 64))
    free = model.head(model.final_norm(states))
    got = conditioned_drafts(model, s, states, free, mx.array(7))
    tok, want = mx.array([7]), []
    for j in range(3):  # by hand: stream j conditioned on the previous stream's top draft
        row = model.head(s.token_head(states[j : j + 1], model.token_embedding(tok[None])[0], model.final_norm))[0]
        want.append(row)
        tok = mx.argmax(row).reshape(1)
    np.testing.assert_allclose(np.array(got), np.array(mx.stack(want)), rtol=1e-5, atol=1e-5)
    ids = mx.array([[3, 9, 100], [5, 5, 2]])
    h = model.final_norm(mx.random.normal((2, 64)))
    full = model.head(h)
    np.testing.assert_allclose(
        np.array(head_scores(model, h, ids)), np.array(mx.take_along_axis(full, ids, -1)), rtol=1e-5, atol=1e-5
    )
    k = _streams(model, token_head_topk=16)
    topk = conditioned_drafts(model, k, states, free, mx.array(7))
    for j in range(3):  # the top-16 re-scored, the rest below them
        best = set(np.argsort(-np.array(free[j]))[:16].tolist())
        assert int(mx.argmax(topk[j])) in best


def test_training_reports_top1_per_stream_and_the_head_learns():
    import mlx.optimizers as optim
    import mlx.nn as nn

    model = tiny_model("llama")
    model.freeze()
    s = SpeculativeStreams(
        StreamConfig(num_streams=2, num_msa_layers=2, lora_rank=4, token_head_rank=16, token_head_topk=8), model
    )
    rng = np.random.RandomState(0)
    motif = rng.randint(3, 250, size=6)
    toks = mx.array(np.stack([np.tile(np.roll(motif, i), 6)[:33] for i in range(8)]))
    mask = mx.ones(toks.shape)
    weights = LossWeights(stream=1.0, pruning=0.0)
    _, m0 = stream_loss(model, s, toks, mask, weights)
    for key in ("stream1", "stream1_cond", "top1_stream1", "top1_stream1_cond", "top1_stream2_decode"):
        assert key in m0
    opt = optim.Adam(1e-2)
    vg = nn.value_and_grad(s, lambda p, t, mk: stream_loss(model, p, t, mk, weights)[0])
    for _ in range(30):
        _, g = vg(s, toks, mask)
        opt.update(s, g)
        mx.eval(s.parameters(), opt.state)
    _, m1 = stream_loss(model, s, toks, mask, weights)
    assert float(m1["stream2_cond"]) < float(m0["stream2_cond"]) - 0.5
    assert float(m1["top1_stream2_cond"]) > float(m0["top1_stream2_cond"])


def test_the_normed_head_reads_the_token_whatever_the_state_scale():
    # The base's top-layer residuals run to ~1,500 on SmolLM2 against ~3 for an embedding: a head
    # added before the final norm is drowned there ("residual", sessions 10-15). "normed" adds after
    # it, so scaling the state changes nothing and the token still moves the drafts.
    model = tiny_model("llama")
    states = mx.random.normal((1, 64))
    e1, e2 = model.token_embedding(mx.array([[5]]))[0], model.token_embedding(mx.array([[77]]))[0]
    for space, invariant in (("normed", True), ("residual", False)):
        s = _streams(model, token_head_space=space)
        a = s.token_head(states, e1, model.final_norm)
        b = s.token_head(states * 1000, e1, model.final_norm)
        assert np.allclose(np.array(a), np.array(b), atol=1e-4) == invariant, space
        moved = float(mx.abs(s.token_head(states * 1000, e2, model.final_norm) - b).max())
        assert (moved > 1e-2) == invariant, (space, moved)


def test_files_without_a_head_space_load_the_residual_head(tmp_path):
    import json

    from mlx_specstream.streams.files import read_stream_config

    f = tmp_path / "speculative_streams.json"
    f.write_text(json.dumps({"num_streams": 2, "token_head_rank": 8}))
    assert read_stream_config(f).token_head_space == "residual"
    f.write_text(json.dumps({"num_streams": 2, "token_head_rank": 8, "token_head_space": "normed"}))
    assert read_stream_config(f).token_head_space == "normed"
    assert StreamConfig().token_head_space == "normed"
    with pytest.raises(Exception, match="token_head_space"):
        StreamConfig(token_head_space="after")
