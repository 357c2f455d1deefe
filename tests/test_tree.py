import mlx.core as mx
import numpy as np
import pytest

from mlx_specstream.tree import build_tree, cartesian, chain, normalize_paths, parse_tree_spec, prune, sparse


def test_three_node_tree_by_hand():
    t = build_tree(((0,), (1,)))
    assert t.paths == ((), (0,), (1,))
    np.testing.assert_array_equal(t.depth, [0, 1, 1])
    np.testing.assert_array_equal(t.parent, [-1, 0, 0])
    np.testing.assert_array_equal(t.rank, [0, 0, 1])
    np.testing.assert_array_equal(t.ancestors, [[1, 0, 0], [1, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(t.children, [[1, 2], [-1, -1], [-1, -1]])
    np.testing.assert_array_equal(t.children, [[1, 2], [-1, -1], [-1, -1]])


def test_five_node_tree_by_hand():
    #        root
    #       /    \
    #    (0)      (1)
    #     |
    #   (0,0)
    #     |
    #  (0,0,0)
    t = build_tree(((0, 0, 0), (1,), (0,), (0, 0)))  # any order in, canonical order out
    assert t.paths == ((), (0,), (1,), (0, 0), (0, 0, 0))
    np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 3])
    np.testing.assert_array_equal(t.parent, [-1, 0, 0, 1, 3])
    np.testing.assert_array_equal(
        t.ancestors.astype(int), [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    )
    np.testing.assert_array_equal(t.children, [[1, 2], [3, -1], [-1, -1], [4, -1], [-1, -1]])
    assert t.path_to(4) == [0, 1, 3, 4] and t.max_depth == 3 and t.max_rank == 2


def test_missing_parent_and_negative_rank_rejected():
    with pytest.raises(ValueError, match="lacks its parent"):
        normalize_paths([(0, 1)])
    with pytest.raises(ValueError, match="negative"):
        normalize_paths([(-1,)])


def test_shapes():
    assert len(cartesian(3, 3)) == 3 + 9 + 27
    assert chain(3) == ((0,), (0, 0), (0, 0, 0))
    s = sparse(4, 10)
    assert len(s) == 10 and all(len(p) <= 4 for p in s)
    assert (0,) in s and (0, 0) in s
    # Measured acceptance decides: rank 1 of stream 1 far better than depth 2.
    s2 = sparse(2, 2, rank_accept=[[0.5, 0.45], [0.1, 0.05]])
    assert s2 == ((0,), (1,))


def test_prune_removes_whole_subtrees():
    t = build_tree(((0,), (1,), (0, 0), (1, 0), (0, 0, 0)))
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (1,0), 5 (0,0,0)
    prob = np.array([1.0, 0.9, 0.05, 0.2, 0.99, 0.6])
    keep = prune(t, prob, 0.1)
    np.testing.assert_array_equal(keep, [1, 1, 0, 1, 0, 1])  # (1,) dropped, so is its child (1,0)
    keep = prune(t, prob, 0.3)
    np.testing.assert_array_equal(keep, [1, 1, 0, 0, 0, 0])  # (0,0) dropped, and (0,0,0) with it
    assert prune(t, prob, 0.0).all()


def test_parse_tree_spec():
    assert parse_tree_spec("chain", 3) == chain(3)
    assert parse_tree_spec("cartesian:2", 2) == cartesian(2, 2)
    assert parse_tree_spec("[[0],[1],[0,0]]", 2) == ((0,), (1,), (0, 0))
    with pytest.raises(ValueError, match="exceeds"):
        parse_tree_spec("chain:4", 3)
    with pytest.raises(ValueError, match="unknown"):
        parse_tree_spec("bushy", 3)


@pytest.mark.parametrize("spec", ["chain:0", "cartesian:0", "cartesian:2:0", "sparse:-1", "chain:1:2:3"])
def test_malformed_tree_specs_are_refused(spec):
    with pytest.raises(ValueError, match="positive"):
        parse_tree_spec(spec, 3)


def test_sizes_from_flags_and_files_are_bounded():
    from mlx_specstream.plan import TreePlan
    from mlx_specstream.streams import StreamConfig

    with pytest.raises(ValueError, match="at most"):
        parse_tree_spec("cartesian:10:6", 6)  # a million nodes
    with pytest.raises(ValueError, match="lookup must be in"):
        TreePlan([], lookup=3000)
    with pytest.raises(ValueError, match="lookup must be in"):
        StreamConfig(lookup=1_000_000)
    with pytest.raises(ValueError, match="beyond any model|out of range"):
        StreamConfig(num_streams=10_000)


def test_a_step_verifies_only_the_context_drafts_found():
    from mlx_specstream.plan import TreePlan

    plan = TreePlan([(0,)], lookup=2)  # (), (0,), (1,), (1, 1)
    assert [p for p in plan.tree.paths] == [(), (0,), (1,), (1, 1)]
    assert plan.with_lookup(2) is plan
    assert plan.with_lookup(1).tree.paths == ((), (0,), (1,))
    assert plan.with_lookup(0).tree.paths == ((), (0,))  # no match: the drafter's node alone, no padding
    assert plan.with_lookup(0) is plan.with_lookup(0)  # built once
    alone = TreePlan([], lookup=3)  # context drafts alone: no match is a plain one-node step
    assert alone.with_lookup(0).size == 1 and alone.with_lookup(2).tree.paths == ((), (1,), (1, 1))
    # the candidate layout is shared: a sub-plan reads the same (levels, width + 1) matrix
    cand = plan.with_context(mx.zeros((1, 1), mx.int32) + 7, [5])
    np.testing.assert_array_equal(np.array(plan.with_lookup(1).tokens(mx.array(3), cand)), [3, 7, 5])
