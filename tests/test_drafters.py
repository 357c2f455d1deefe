"""The drafter interface: every drafter through the one loop. Here the draft-model drafter
(two-model speculative decoding in our verifier) and the per-decode tree plan; streams and
Medusa have their own test modules."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_specstream import load
from mlx_specstream.cache import PromptCache
from mlx_specstream.checkpoint import CheckpointError, load_model
from mlx_specstream.decode import generate_step, tree_generate_step
from mlx_specstream.drafters import DraftedModel, DraftModelDrafter
from mlx_specstream.generate import cached_stream_generate, stream_generate
from mlx_specstream.loading import load_draft_model
from mlx_specstream.plan import MAX_SUBPLANS, TreePlan
from mlx_specstream.sample import SamplingParams
from mlx_specstream.tree import cartesian, chain


def _prompt(n, seed=0):
    return mx.array(np.random.RandomState(seed).randint(3, 500, size=n))


def ar_tokens(model, prompt, n):
    return [t for t, _ in generate_step(prompt, model, max_tokens=n)]


def draft_tokens(model, drafter, prompt, n, **kw):
    out, steps = [], 0
    for r in tree_generate_step(prompt, model, drafter, max_tokens=n, **kw):
        out += r.tokens
        steps += 1
    return out[:n], steps


@pytest.mark.parametrize(
    "target,draft,k,tree,lookup",
    [
        ("llama", "llama_linear_rope", 3, None, 0),
        ("llama", "llama_linear_rope", 1, None, 0),
        ("qwen2", "qwen3", 4, cartesian(2, 2), 0),
        ("llama", "mistral", 2, None, 3),
    ],
)
def test_draft_model_greedy_equals_plain_greedy(hf_model, target, draft, k, tree, lookup):
    model, _ = load_model(hf_model(target)[0])
    drafter = load_draft_model(hf_model(draft)[0], model, num_draft=k)
    prompt = _prompt(17, seed=k)
    got, _ = draft_tokens(model, drafter, prompt, 120, tree=tree, lookup=lookup)
    assert got == ar_tokens(model, prompt, 120)


def test_draft_model_equal_to_the_target_accepts_every_draft(hf_model):
    """The draft cache follows the accepted path exactly: a draft model identical to the target
    drafts what the target says, so every step accepts all k drafts."""
    model, _ = load_model(hf_model("llama")[0])
    twin, _ = load_model(hf_model("llama")[0])
    k = 3
    prompt = _prompt(9, seed=1)
    steps = list(tree_generate_step(prompt, model, DraftModelDrafter(twin, k), max_tokens=80))
    assert [t for r in steps for t in r.tokens][:80] == ar_tokens(model, prompt, 80)
    assert [r.depth for r in steps[1:-1]] == [k] * (len(steps) - 2)  # the first step has no drafts yet


def test_draft_model_reuses_its_cache_across_turns(hf_model):
    model, tok = load(str(hf_model("llama")[0]))
    twin, _ = load_model(hf_model("llama")[0])
    drafter = DraftModelDrafter(twin, 2)
    dm = DraftedModel(model, drafter)
    pc = PromptCache(model)
    first, second = _prompt(12, seed=2).tolist(), _prompt(5, seed=3).tolist()
    a = [t for r in cached_stream_generate(dm, tok, pc, first, max_tokens=20) for t in r.tokens]
    assert a == ar_tokens(model, mx.array(first), 20)[: len(a)]
    convo = first + a + second
    rows_before = len(drafter.pc.tokens)
    b = list(cached_stream_generate(dm, tok, pc, convo, max_tokens=20))
    assert [t for r in b for t in r.tokens] == ar_tokens(model, mx.array(convo), 20)[: sum(len(r.tokens) for r in b)]
    assert rows_before > len(first)  # the first turn's rows were kept for the second
    assert all(r.accepted == 3 for r in b[1:-1])


def test_draft_model_sampling_is_seeded(hf_model):
    model, tok = load(str(hf_model("llama")[0]))
    dm = DraftedModel(model, load_draft_model(hf_model("llama_linear_rope")[0], model, num_draft=3))
    sp = SamplingParams(temp=0.8)
    runs = []
    for _ in range(2):
        mx.random.seed(7)
        runs.append([t for r in stream_generate(dm, tok, "def f(x):", max_tokens=30, sampling=sp) for t in r.tokens])
    assert runs[0] == runs[1] and len(runs[0]) == 30


def test_draft_model_needs_the_same_vocabulary(hf_model, tmp_path):
    from mlx_specstream.checkpoint import save_model
    from mlx_specstream.models import build_model

    model, config = load_model(hf_model("llama")[0])
    config = dict(config, vocab_size=config["vocab_size"] + 8)
    other = tmp_path / "other"
    save_model(other, build_model(config), config)
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_draft_model(other, model)
    with pytest.raises(ValueError, match="num_draft"):
        DraftModelDrafter(model, 0)


def test_cli_draft_model(hf_model, tmp_path, capsys):
    from mlx_specstream.cli import main

    d, draft = hf_model("llama")[0], hf_model("llama_linear_rope")[0]
    args = ["generate", "--model", str(d), "--prompt", "def", "-m", "30", "--json"]
    assert main(args + ["--draft-model", str(draft), "--num-draft", "2"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    ar = json.loads(capsys.readouterr().out)
    assert spec["text"] == ar["text"] and spec["speculative"] and not ar["speculative"]


# ---------------------------------------------------------------- the tree plan


def test_plan_with_context_drafts_by_hand():
    """The docstring's example: drafter paths [(0,)], lookup 2."""
    plan = TreePlan([(0,)], lookup=2)
    assert plan.tree.paths == ((), (0,), (1,), (1, 1))
    assert (plan.width, plan.draft_levels, plan.levels) == (1, 1, 2)
    cand = plan.with_context(mx.array([[7]], mx.int32), [4, 5])  # drafter's top-1: 7; context: 4 5
    np.testing.assert_array_equal(np.array(cand), [[7, 4], [0, 5]])
    np.testing.assert_array_equal(np.array(plan.tokens(mx.array(9), cand)), [9, 7, 4, 5])
    assert plan.root_only.size == 1 and plan.root_only.width == 1


def test_subplans_are_bounded_and_keep_node_order():
    plan = TreePlan(cartesian(3, 3))
    sub = plan.subplan(np.array([0, 2, 7]))
    assert sub.tree.paths == ((), (1,), (1, 0)) and sub.width == plan.width
    assert plan.subplan(np.array([0, 2, 7])) is sub  # built once
    rng = np.random.RandomState(0)
    for _ in range(3 * MAX_SUBPLANS):  # random survivor sets, closed under ancestors (as pruning leaves them)
        picked = rng.rand(plan.size) < 0.2
        plan.subplan(np.flatnonzero(plan.tree.ancestors[picked].any(axis=0) | (np.arange(plan.size) == 0)))
    assert len(plan._subplans) == MAX_SUBPLANS


def test_plan_masks_are_built_once_per_plan():
    plan = TreePlan(chain(2))
    built = []
    m1 = plan.cached(("x",), lambda: built.append(1) or mx.ones((2, 2)))
    m2 = plan.cached(("x",), lambda: built.append(1) or mx.ones((2, 2)))
    assert m1 is m2 and built == [1]
    assert TreePlan(chain(2))._masks == {}  # nothing global
