"""Draft vocabularies: streams draft from the training data's most frequent targets (a shortlist of
the LM head's rows). Greedy decoding stays exactly the base's; drafts are the shortlist's argmax;
the ranking travels in the adapter file; a size the file cannot serve is refused by name."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_lm_families import tiny_model
from mlx_specstream.checkpoint import CheckpointError
from mlx_specstream.decode import generate_step, launch_step, tree_generate_step
from mlx_specstream.drafters import DraftState, StreamDrafter
from mlx_specstream.acceptance import GreedyAcceptance
from mlx_specstream.cache import make_cache
from mlx_specstream.errors import UserError
from mlx_specstream.models.base import sub_head
from mlx_specstream.plan import TreePlan
from mlx_specstream.streams import SpeculativeStreams, StreamConfig, load_streams, save_streams
from mlx_specstream.streams.files import vocab_ranking
from mlx_specstream.tree import cartesian, chain


def _streams(model, n, head=0, **kw):
    s = SpeculativeStreams(
        StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4, token_head_rank=head, draft_vocab=n, **kw), model
    )
    mx.random.seed(3)
    s.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, s.parameters()))
    s.vocab_ranking = np.random.RandomState(5).permutation(model.args.vocab_size).astype(np.int32)
    return s


@pytest.mark.parametrize("name,head", [("llama", 0), ("llama", 8), ("gemma2", 8)])
def test_a_draft_vocabulary_decodes_exactly_the_base(name, head):
    model = tiny_model(name)
    prompt = mx.array(np.random.RandomState(1).randint(3, 250, size=14))
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=30)]
    d = StreamDrafter(_streams(model, 40, head, token_head_topk=16))
    for tree in (cartesian(3, 2), chain(3)):
        out = []
        for r in tree_generate_step(prompt, model, d, max_tokens=30, tree=[list(p) for p in tree], lookup=2):
            out += r.tokens
        assert out[:30] == ref


def test_drafts_are_the_shortlists_best_tokens():
    model = tiny_model("granite")  # a logit transform: the sub-head must apply it too
    s = _streams(model, 40)
    ids = s.draft_ids()
    h = model.final_norm(mx.random.normal((2, 64)))
    np.testing.assert_allclose(np.array(sub_head(model, ids)(h)), np.array(model.head(h)[:, ids]), rtol=1e-5, atol=1e-5)
    d = StreamDrafter(s)
    cache = make_cache(model)
    plan = TreePlan([[0], [0, 0]], width=2, levels=3)
    p = launch_step(
        model, d, plan, DraftState(mx.array(5, mx.int32), plan.empty_candidates()), cache, GreedyAcceptance()
    )
    allowed = set(np.array(ids).tolist())
    assert set(np.array(p.cand).ravel().tolist()) <= allowed  # only shortlist tokens are ever drafted
    full = StreamDrafter(_streams(model, 0))
    q = launch_step(
        model,
        full,
        plan,
        DraftState(mx.array(5, mx.int32), plan.empty_candidates()),
        make_cache(model),
        GreedyAcceptance(),
    )
    assert not set(np.array(q.cand).ravel().tolist()) <= allowed  # the control: the whole vocabulary drafts outside it


def test_the_ranking_travels_in_the_adapter_file_and_a_missing_one_is_named(tmp_path):
    model = tiny_model("llama")
    s = _streams(model, 40)
    cfg = save_streams(tmp_path, s)
    back = load_streams(cfg, model)
    assert np.array_equal(back.vocab_ranking, s.vocab_ranking)
    assert np.array_equal(np.array(back.draft_ids()), np.sort(s.vocab_ranking[:40]))
    assert load_streams(cfg, model, draft_vocab=0).draft_ids() is None  # the whole vocabulary on request
    with pytest.raises(UserError, match="draft_vocab 500 needs the adapter file to rank at least 500"):
        load_streams(cfg, model, draft_vocab=500)
    s.vocab_ranking = None
    with pytest.raises(UserError, match="no token ranking"):
        load_streams(save_streams(tmp_path, s, "bare"), model)
    s.vocab_ranking = np.array([3, 3, 4], np.int32)
    with pytest.raises(CheckpointError, match="distinct token ids"):
        load_streams(save_streams(tmp_path, s, "dup"), model, draft_vocab=2)


def test_the_ranking_is_by_target_frequency():
    assert vocab_ranking(np.array([0, 5, 2, 5, 0, 1])).tolist() == [1, 3, 2, 5]
