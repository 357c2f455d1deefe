"""Per-step tree sizing: the choice by hand, its invariants, the running context statistics."""

import numpy as np
import pytest

from mlx_specstream.errors import UserError
from mlx_specstream.sizing import AutoTree, Calibration, ContextStats, CostCurve, choose_tree


def test_choose_tree_by_hand():
    cost = CostCurve((1, 2, 3), (1.0, 1.1, 1.2))
    # rates 1.0, 1.9 / 1.1 = 1.73, 2.1 / 1.2 = 1.75: both nodes
    assert choose_tree(np.array([[0.9, 0.05]]), [0.2], cost) == (((0,),), 1)
    # nothing worth a node: a plain step
    assert choose_tree(np.array([[0.05, 0.01]]), [0.05], cost) == ((), 0)
    assert choose_tree(None, [], cost) == ((), 0)
    # context alone, a chain as long as it pays
    assert choose_tree(None, [0.9, 0.8, 0.1], CostCurve((1, 4), (1.0, 1.3))) == ((), 2)


def test_chosen_nodes_always_include_their_parents_and_stay_within_budget():
    rng = np.random.RandomState(0)
    for _ in range(200):
        conf = rng.dirichlet(np.ones(5), size=3)[:, :3]
        ctx = np.minimum.accumulate(rng.rand(rng.randint(0, 6)))
        cost = CostCurve((1, 2, 4, 8, 16), tuple(np.cumsum([1.0] + list(rng.rand(4) * 0.5))))
        paths, k = choose_tree(conf, list(ctx), cost, max_nodes=12)
        assert len(paths) + k + 1 <= 12 and k <= len(ctx)
        for p in paths:
            assert len(p) <= 3 and all(r < 3 for r in p) and (len(p) == 1 or p[:-1] in paths)


def test_cheaper_steps_grow_the_tree():
    conf = np.array([[0.5, 0.2, 0.1], [0.5, 0.2, 0.1]])
    flat, steep = CostCurve((1, 16), (1.0, 1.2)), CostCurve((1, 2, 16), (1.0, 1.6, 8.0))
    assert len(choose_tree(conf, [], flat)[0]) > len(choose_tree(conf, [], steep)[0])
    assert choose_tree(conf, [], steep) == ((), 0)


def test_context_stats_learn_from_what_was_accepted():
    st = ContextStats()
    before = st.estimate(3, 4)
    assert before == sorted(before, reverse=True) and before[0] == pytest.approx(st.prior[2])
    assert st.estimate(40, 1)[0] > st.estimate(5, 1)[0] > st.estimate(1, 1)[0]  # longer runs: likelier
    for _ in range(20):
        st.update(3, verified=4, accepted=0)
    assert st.estimate(3, 4)[0] < 0.1 and st.estimate(1, 1)[0] == pytest.approx(st.prior[0])  # per run length
    assert st.bin(9) == st.bin(15) != st.bin(16)
    for _ in range(40):
        st.update(2, verified=3, accepted=3)
    assert st.estimate(2, 3)[2] > 0.9


def test_cost_curve_and_calibration():
    c = CostCurve((1, 2, 4), (1.0, 1.2, 1.6))
    assert c(3) == pytest.approx(1.4) and c(8) == pytest.approx(3.2)
    assert CostCurve.from_dict(c.to_dict()) == c
    for bad in ({"sizes": [2, 4], "cost": [1, 2]}, {"sizes": [1, 2], "cost": [1, float("nan")]}, {"sizes": [1]}):
        with pytest.raises(UserError):
            CostCurve.from_dict(bad)
    cal = Calibration(edges=(0.0, 0.5), by_depth=((0.1, 0.7), (0.05, 0.4)))
    np.testing.assert_allclose(cal(np.array([0.2, 0.9]), 0), [0.1, 0.7])
    np.testing.assert_allclose(cal(np.array([0.2, 0.9]), 5), [0.05, 0.4])  # past the table: its last row


def test_auto_tree_plans_are_built_once_and_share_one_layout():
    auto = AutoTree(CostCurve((1, 16), (1.0, 1.1)), width=2, levels=2, lookup=3)
    conf = np.array([[0.9, 0.3], [0.8, 0.1]])
    p1 = auto.next_plan(conf, [5, 6, 7], match=3)
    assert auto.next_plan(conf, [5, 6, 7], match=3) is p1
    assert p1.width == 2 and p1.drafts == 2 and p1.lookup == 3
    assert all(path[0] == 2 for path in p1.tree.paths[1:] if path and path[0] >= 2)  # context at rank width
    assert auto.next_plan(None, [], 0).size >= 1
    assert sum(auto.sizes.values()) == 3


def test_draft_confidence_is_calibrated_online_from_what_was_accepted():
    from mlx_specstream.sizing import DraftStats

    st = DraftStats()
    assert st(np.array([0.5]), 0)[0] == pytest.approx(0.5)  # unseen: the raw value
    for _ in range(40):
        st.update(0, 0.5, accepted=False)
    assert st(np.array([0.5]), 0)[0] < 0.1 and st(np.array([0.5]), 1)[0] == pytest.approx(0.5)  # per depth
    # through AutoTree: overconfident drafts stop being verified
    auto = AutoTree(CostCurve((1, 2, 16), (1.0, 1.1, 2.0)), width=1, levels=1, lookup=0)
    conf = np.array([[0.8]])
    assert auto.next_plan(conf, [], 0).size == 2
    for _ in range(30):
        plan = auto.next_plan(conf, [], 0)
        auto.observe(plan, 0, ())  # the draft was never accepted
    assert auto.next_plan(conf, [], 0).size == 1


def test_context_drafts_measure_how_long_the_match_runs():
    from mlx_specstream.drafters.context import ContextDrafts

    src = [10, 11, 12, 13, 14, 15, 16, 17]
    ctx = ContextDrafts(src + [99] + src[:6], 3)  # the last 6 tokens repeat the source's first 6
    assert ctx.propose() == [16, 17, 99] and ctx.match == 6
    ctx = ContextDrafts([1, 2, 7, 1, 2], 2)  # only the 2-gram matches
    assert ctx.propose() == [7, 1] and ctx.match == 2
    long = list(range(100, 160))
    ctx = ContextDrafts(long + long[:50], 1)
    assert ctx.propose() == [150] and ctx.match == 32  # measured up to MAX_RUN


def test_sampling_reads_the_context_priors_fitted_nearest_its_temperature(monkeypatch):
    from mlx_specstream import sizing

    monkeypatch.setattr(sizing, "CONTEXT_PRIORS", {0.0: (0.4,) * 6, 0.7: (0.2,) * 6})
    assert sizing.context_priors(0.0) == (0.4,) * 6
    assert sizing.context_priors(0.6) == sizing.context_priors(1.5) == (0.2,) * 6
    # fewer expected acceptances, fewer drafts verified: the lower prior sizes a shorter chain
    cost = sizing.CostCurve((1, 2, 4, 8), (1.0, 1.2, 1.5, 1.8))
    k = [
        sizing.choose_tree(None, sizing.ContextStats(sizing.context_priors(t)).estimate(4, 8), cost)[1]
        for t in (0.0, 0.7)
    ]
    assert k[0] > k[1]


def test_a_pipelined_plain_step_prices_trees_against_its_own_cost():
    # 4-bit SmolLM2 on the 2-core CPU: cost(1) timed step by step 1.06, a tree of 2 1.78; the loop
    # queueing plain steps early runs them at ~0.97. A draft right 70% of the time pays against the
    # former (1.7 / 1.78 > 1 / 1.06) and not against the latter (1 / 0.97).
    c = CostCurve((1, 2, 3), (1.06, 1.78, 2.62), plain=0.97)
    conf = np.array([[0.7, 0.0]])
    assert choose_tree(conf, [], c) == (((0,),), 0)
    assert choose_tree(conf, [], c, plain=c.plain) == ((), 0)
    assert CostCurve.from_dict(c.to_dict()) == c and "plain" not in CostCurve((1,), (1.0,)).to_dict()
    with pytest.raises(UserError):
        CostCurve((1,), (1.0,), plain=0.0)
    sizer = AutoTree(c, width=2, levels=1)
    assert sizer.next_plan(conf[:, :2], [], 0).size == 2
    sizer.pipelined = True  # what the loop sets when it queues plain steps early
    assert sizer.next_plan(conf[:, :2], [], 0).size == 1


def test_the_calibration_times_pipelined_plain_steps_where_the_loop_runs_them(monkeypatch, tmp_path):
    import mlx.core as mx

    from mlx_lm_families import tiny_model
    from mlx_specstream import calibrate, decode
    from mlx_specstream.drafters import Verifier

    model = tiny_model("llama")
    curve = calibrate.measure_cost(
        model, Verifier(), width=1, levels=0, sizes=(1, 2), prefix=16, trials=1, pipelined=True
    )
    assert curve.plain is not None and curve.plain > 0
    assert calibrate.measure_cost(model, Verifier(), width=1, levels=0, sizes=(1, 2), prefix=16, trials=1).plain is None
    # a cached curve without the plain entry is measured again where plain steps are pipelined
    monkeypatch.setattr(calibrate, "_cache_dir", lambda: tmp_path)
    seen = []
    monkeypatch.setattr(calibrate, "measure_cost", lambda *a, **k: seen.append(k["pipelined"]) or curve)
    key = calibrate._shape_key(model, Verifier(), 1, 0)
    (tmp_path / f"cost-{key}.json").write_text('{"sizes": [1, 2], "cost": [1.0, 1.5]}')
    monkeypatch.setattr(calibrate, "pipelines_plain_steps", lambda m: False)
    assert calibrate.cost_curve(model, Verifier(), width=1, levels=0).plain is None and seen == []
    monkeypatch.setattr(calibrate, "pipelines_plain_steps", lambda m: True)
    assert calibrate.cost_curve(model, Verifier(), width=1, levels=0) == curve and seen == [True]
    kept = CostCurve.from_dict(curve.to_dict())
    assert calibrate.cost_curve(model, Verifier(), width=1, levels=0) == kept and seen == [True]
    # the loop tells its sizer whether plain steps are queued early
    for pipe in (True, False):
        sizer = AutoTree(curve, width=1, levels=0)
        list(
            decode.tree_generate_step(mx.array([5, 6, 7]), model, Verifier(), max_tokens=3, sizer=sizer, pipeline=pipe)
        )
        assert sizer.pipelined is pipe
