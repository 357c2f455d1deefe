"""Acceptance rules: greedy exactness and a statistical test that tree sampling preserves the
target distribution — with the paper's per-path rule as a negative control that must fail it."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_specstream.acceptance import GreedyAcceptance, SamplingAcceptance
from mlx_specstream.sample import SamplingParams
from mlx_specstream.plan import TreePlan
from mlx_specstream.tree import build_tree

V = 4
PATHS = ((0,), (1,), (0, 0), (1, 0))  # root, two depth-1 drafts, one depth-2 draft under each
TOKENS = [0, 1, 3, 2, 2]  # root, (0,), (1,), (0,0), (1,0)
CHI2_CRIT_15DF_P001 = 37.70


def target_logits(seq):
    """A fixed, arbitrary 'model': logits of the next token after ``seq``."""
    rs = np.random.RandomState(abs(hash(tuple(seq))) % (2**31))
    return rs.normal(size=V) * 1.2


def q(seq, temp=1.0):
    z = target_logits(seq) / temp
    p = np.exp(z - z.max())
    return p / p.sum()


def node_seqs(tree, tokens=TOKENS):
    return [[tokens[j] for j in tree.path_to(i)] for i in range(tree.size)]


def expected_joint(temp=1.0, tokens=TOKENS):
    root = [tokens[0]]
    p1 = q(root, temp)
    return np.array([[p1[a] * q(root + [a], temp)[b] for b in range(V)] for a in range(V)])


def chi2(counts, expected_p):
    n = counts.sum()
    e = expected_p * n
    return float(((counts - e) ** 2 / e).sum())


def draw_pairs(step, n, temp, seed, paths=PATHS, tokens=TOKENS):
    """Run one tree step ``n`` times; complete to two tokens with the target where the step
    emitted one (the next step's correction would be exactly that draw)."""
    tree = build_tree(paths)
    seqs = node_seqs(tree, tokens)
    rng = np.random.RandomState(seed)
    counts = np.zeros((V, V))
    for _ in range(n):
        out = step(tree, seqs, rng, tokens)
        if len(out) < 2:
            out = out + [rng.choice(V, p=q([tokens[0]] + out, temp))]
        counts[out[0], out[1]] += 1
    return counts


def ours(temp, rule_class=SamplingAcceptance, **filters):
    rule = rule_class(SamplingParams(temp=temp, **filters).law)

    def step(tree, seqs, rng, tokens=TOKENS):
        dt = TreePlan(tree.paths)
        logits = mx.array(np.stack([target_logits(s) for s in seqs]).astype(np.float32))
        key = mx.random.key(int(rng.randint(2**31)))
        best, corr = rule(dt, mx.array(tokens), logits, key=key)
        path = tree.path_to(int(best.item()))
        return [tokens[i] for i in path[1:]] + [int(corr.item())]

    return step


class NoDedupAcceptance(SamplingAcceptance):
    """The rule before duplicate siblings were handled: a token repeated by a later sibling
    keeps its mass after the first copy was rejected (the failing control)."""

    @staticmethod
    def child_mass(p, child_tok, valid):
        return mx.take_along_axis(p, child_tok, axis=1) * valid


def paper_rule(temp):
    """Per-path rejection sampling against the stream distribution (paper, ENLSP §3.1.5): accept
    draft x if r < min(1, q_main(x)/q_stream(x)); the longest accepted path wins; on rejection
    sample the residual max(0, q_main - q_stream), renormalised (the kindest reading)."""
    streams = [np.array([0.5, 0.3, 0.1, 0.1]), np.array([0.2, 0.2, 0.5, 0.1])]

    def step(tree, seqs, rng, tokens=TOKENS):
        best = None
        for leaf in (i for i in range(tree.size) if tree.children[i, 0] < 0):
            path = tree.path_to(leaf)
            n_ok = 0
            for i in path[1:]:
                x, d = TOKENS[i], tree.depth[i]
                ratio = q(seqs[tree.parent[i]], temp)[x] / streams[d - 1][x]
                if rng.rand() < min(1.0, ratio):
                    n_ok += 1
                else:
                    break
            if best is None or n_ok > best[1]:
                best = (path, n_ok)
        path, n_ok = best
        acc = path[: n_ok + 1]
        last = acc[-1]
        qm = q(seqs[last], temp)
        if n_ok < len(path) - 1:
            r = np.maximum(qm - streams[tree.depth[path[n_ok + 1]] - 1], 0)
            qm = r / r.sum()
        return [TOKENS[i] for i in acc[1:]] + [int(rng.choice(V, p=qm))]

    return step


# Awkward trees: duplicate siblings (a stream draft equal to a context draft), duplicates under
# a deeper node, three levels, and a model column beside a context-draft chain (rank 1 here).
TREES = {
    "plain": (PATHS, TOKENS),
    "duplicate siblings": (PATHS, [0, 1, 1, 2, 3]),
    "duplicates at depth 2": (((0,), (0, 0), (0, 1), (0, 2)), [0, 1, 2, 2, 1]),
    "three levels": (((0,), (1,), (0, 0), (0, 0, 0), (1, 0)), [0, 2, 1, 3, 1, 0]),
    "context column": (((0,), (1,), (1, 1), (1, 1, 1)), [0, 3, 3, 1, 2]),
}


@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("tree", list(TREES))
def test_tree_sampling_preserves_target_distribution(temp, tree):
    paths, tokens = TREES[tree]
    counts = draw_pairs(ours(temp), 3000, temp, seed=1, paths=paths, tokens=tokens)
    stat = chi2(counts, expected_joint(temp, tokens))
    assert stat < CHI2_CRIT_15DF_P001, (stat, counts)


@pytest.mark.parametrize("tree", ["duplicate siblings", "context column"])
def test_ignoring_duplicate_siblings_fails_the_same_test(tree):
    paths, tokens = TREES[tree]
    counts = draw_pairs(ours(0.7, NoDedupAcceptance), 3000, 0.7, seed=1, paths=paths, tokens=tokens)
    assert chi2(counts, expected_joint(0.7, tokens)) > CHI2_CRIT_15DF_P001


def test_paper_per_path_rule_fails_the_same_test():
    counts = draw_pairs(paper_rule(1.0), 3000, 1.0, seed=1)
    assert chi2(counts, expected_joint(1.0)) > CHI2_CRIT_15DF_P001


def test_sampling_with_top_k_never_leaves_the_support():
    tree = build_tree(PATHS)
    dt = TreePlan(tree.paths)
    logits = mx.array(np.stack([target_logits(s) for s in node_seqs(tree)]).astype(np.float32))
    rule = SamplingParams(temp=1.0, top_k=1).acceptance()  # top-1 support: behaves like greedy
    g_best, g_corr = GreedyAcceptance()(dt, mx.array(TOKENS), logits)
    for s in range(50):
        best, corr = rule(dt, mx.array(TOKENS), logits, key=mx.random.key(s))
        assert best.item() == g_best.item() and corr.item() == g_corr.item()


def test_greedy_acceptance_by_hand():
    tree = build_tree(PATHS)  # tokens: root 0, (0,)=1, (1,)=3, (0,0)=2, (1,0)=2
    dt = TreePlan(tree.paths)
    big = lambda t: np.eye(V)[t] * 10  # noqa: E731
    # root predicts 3 -> node 2 accepted; node 2 predicts 2 -> node 4 accepted; node 4 predicts 1
    logits = mx.array(np.stack([big(3), big(0), big(2), big(0), big(1)]).astype(np.float32))
    best, corr = GreedyAcceptance()(dt, mx.array(TOKENS), logits)
    assert best.item() == 4 and corr.item() == 1
    # root predicts 0 (no child has it): nothing accepted, correction 0
    logits = mx.array(np.stack([big(0), big(2), big(2), big(0), big(1)]).astype(np.float32))
    best, corr = GreedyAcceptance()(dt, mx.array(TOKENS), logits)
    assert best.item() == 0 and corr.item() == 0


def test_sampling_params_pick_rules():
    assert isinstance(SamplingParams().acceptance(), GreedyAcceptance)
    assert isinstance(SamplingParams(temp=0.5).acceptance(), SamplingAcceptance)


# --- Filters: the tree's law must be the plain sampler's, tested against mlx-lm's own draws. ---
# 5% of the critical values of chi-square at p = 0.001 by degrees of freedom (two-sample test).
CHI2_CRIT_P001 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
    10: 29.59,
    11: 31.26,
    12: 32.91,
    13: 34.53,
    14: 36.12,
    15: 37.70,
}
FILTERS = {
    "top-p": dict(top_p=0.75),
    "min-p": dict(min_p=0.25),
    "top-k": dict(top_k=2),
    "mix": dict(top_p=0.9, min_p=0.1, top_k=3),
}
FILTER_TREES = {"children": TREES["plain"], "duplicate siblings": TREES["duplicate siblings"], "no children": ((), [0])}


def log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def mlx_lm_sampler(temp, **filters):
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(
        temp, top_p=filters.get("top_p", 0.0), min_p=filters.get("min_p", 0.0), top_k=filters.get("top_k", 0)
    )


def plain_pairs(n, temp, seed, root, **filters):
    """Two tokens after ``root`` drawn ``n`` times by mlx-lm's ``make_sampler`` (plain decoding)."""
    sampler = mlx_lm_sampler(temp, **filters)
    mx.random.seed(seed)
    first = np.array(sampler(mx.array(np.tile(log_softmax(target_logits(root)), (n, 1)).astype(np.float32))))
    nxt = np.stack([log_softmax(target_logits(root + [a])) for a in range(V)]).astype(np.float32)
    second = np.array(sampler(mx.array(nxt[first])))
    counts = np.zeros((V, V))
    np.add.at(counts, (first, second), 1)
    return counts


def tree_pairs(step, n, temp, seed, paths, tokens, **filters):
    """Like :func:`draw_pairs`, completing a one-token step with mlx-lm's sampler."""
    sampler = mlx_lm_sampler(temp, **filters)
    tree = build_tree(paths)
    seqs = node_seqs(tree, tokens)
    rng = np.random.RandomState(seed)
    mx.random.seed(seed + 1)
    counts = np.zeros((V, V))
    for _ in range(n):
        out = step(tree, seqs, rng, tokens)
        if len(out) < 2:
            lp = log_softmax(target_logits([tokens[0]] + out)).astype(np.float32)
            out = out + [int(sampler(mx.array(lp[None]))[0].item())]
        counts[out[0], out[1]] += 1
    return counts


def two_sample_chi2(a, b):
    """Homogeneity of two count tables: (statistic, degrees of freedom)."""
    a, b = a.ravel(), b.ravel()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    k1, k2 = np.sqrt(b.sum() / a.sum()), np.sqrt(a.sum() / b.sum())
    return float(((a * k1 - b * k2) ** 2 / (a + b)).sum()), int(keep.sum()) - 1


def tree_rule(rule):
    def step(tree, seqs, rng, tokens):
        dt = TreePlan(tree.paths)
        logits = mx.array(np.stack([target_logits(s) for s in seqs]).astype(np.float32))
        best, corr = rule(dt, mx.array(tokens), logits, key=mx.random.key(int(rng.randint(2**31))))
        return [tokens[i] for i in tree.path_to(int(best.item()))[1:]] + [int(corr.item())]

    return step


class TemperatureFirstAcceptance(SamplingAcceptance):
    """The rule before the fix (the failing control): temperature applied before the filters."""

    def __init__(self, temp, **filters):
        self.temp, self.filters = temp, filters

    def target_probs(self, logits):
        lp = logits.astype(mx.float32) / self.temp
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        return mx.softmax(SamplingParams(temp=1.0, **self.filters).law(lp), axis=-1)


def support(temp, root, **filters):
    """Tokens plain decoding can emit first (mlx-lm's own filter functions)."""
    lp = mx.array(log_softmax(target_logits(root)).astype(np.float32))[None]
    return set(np.flatnonzero(np.isfinite(np.array(SamplingParams(temp=temp, **filters).law(lp))[0])))


@pytest.mark.parametrize("temp", [0.7, 1.5])
@pytest.mark.parametrize("filt", list(FILTERS))
@pytest.mark.parametrize("tree", list(FILTER_TREES))
def test_tree_sampling_with_filters_follows_mlx_lm_sampler(temp, filt, tree):
    paths, tokens = FILTER_TREES[tree]
    n = 2000
    spec = tree_pairs(ours(temp, **FILTERS[filt]), n, temp, seed=3, paths=paths, tokens=tokens, **FILTERS[filt])
    plain = plain_pairs(n, temp, seed=4, root=[tokens[0]], **FILTERS[filt])
    stat, df = two_sample_chi2(spec, plain)
    assert stat < CHI2_CRIT_P001[df], (stat, df, spec, plain)
    # never a token plain decoding cannot emit
    assert set(np.flatnonzero(spec.sum(axis=1))) <= support(temp, [tokens[0]], **FILTERS[filt])


@pytest.mark.parametrize("temp,filt", [(0.7, "min-p"), (1.5, "top-p")])
def test_temperature_before_filters_fails_the_same_test(temp, filt):
    paths, tokens = FILTER_TREES["children"]
    n = 2000
    rule = TemperatureFirstAcceptance(temp, **FILTERS[filt])
    spec = tree_pairs(tree_rule(rule), n, temp, seed=3, paths=paths, tokens=tokens, **FILTERS[filt])
    plain = plain_pairs(n, temp, seed=4, root=[tokens[0]], **FILTERS[filt])
    stat, df = two_sample_chi2(spec, plain)
    assert stat > CHI2_CRIT_P001[df], (stat, df)


def test_law_by_hand():
    """The issue's example: p = (.5, .3, .15, .05), T = .7, min-p .25 keeps three tokens."""
    lp = mx.array(np.log([[0.5, 0.3, 0.15, 0.05]]).astype(np.float32))
    got = np.array(mx.softmax(SamplingParams(temp=0.7, min_p=0.25).law(lp), axis=-1))[0]
    kept = np.array([0.5, 0.3, 0.15]) ** (1 / 0.7)
    np.testing.assert_allclose(got, np.append(kept / kept.sum(), 0), atol=1e-6)
    np.testing.assert_allclose(got[:3], [0.60, 0.29, 0.11], atol=0.01)


def shape_per_step(temp, rule, trees, rng_seed, **filters):
    """A step function whose tree shape changes every step, chosen from the drafts alone (here a
    draw independent of the target, as per-step sizing chooses from the drafts' confidence)."""
    shapes = [(build_tree(p), p, t) for p, t in trees]
    pick = np.random.RandomState(rng_seed)

    def step(_tree, _seqs, rng, _tokens):
        tree, paths, tokens = shapes[pick.randint(len(shapes))]
        dt = TreePlan(tree.paths)
        seqs = node_seqs(tree, tokens)
        logits = mx.array(np.stack([target_logits(s) for s in seqs]).astype(np.float32))
        best, corr = rule(dt, mx.array(tokens), logits, key=mx.random.key(int(rng.randint(2**31))))
        return [tokens[i] for i in tree.path_to(int(best.item()))[1:]] + [int(corr.item())]

    return step


PER_STEP_TREES = [TREES["plain"], TREES["duplicate siblings"], TREES["three levels"], ((), [0]), (((0,),), [0, 2])]


@pytest.mark.parametrize("temp,filt", [(0.7, "mix"), (1.5, "top-p"), (1.0, None)])
def test_tree_shapes_chosen_per_step_keep_the_law(temp, filt):
    filters = FILTERS.get(filt, {})
    step = shape_per_step(temp, SamplingParams(temp=temp, **filters).acceptance(), PER_STEP_TREES, 5)
    spec = tree_pairs(step, 2000, temp, seed=3, paths=PATHS, tokens=TOKENS, **filters)
    plain = plain_pairs(2000, temp, seed=4, root=[0], **filters)
    stat, df = two_sample_chi2(spec, plain)
    assert stat < CHI2_CRIT_P001[df], (stat, df)


def test_per_step_shapes_do_not_hide_a_broken_rule():
    trees = [TREES["duplicate siblings"], TREES["context column"]]
    step = shape_per_step(0.7, NoDedupAcceptance(SamplingParams(temp=0.7).law), trees, 5)
    spec = tree_pairs(step, 2000, 0.7, seed=3, paths=PATHS, tokens=TOKENS)
    plain = plain_pairs(2000, 0.7, seed=4, root=[0])
    stat, df = two_sample_chi2(spec, plain)
    assert stat > CHI2_CRIT_P001[df], (stat, df)
