"""mlx-lm's ``logprobs`` and ``from_draft`` on every response: tree decoding hands the target's
log-probabilities at each emitted token (rows of the tree's logits) equal to plain decoding's, and
marks the accepted drafts."""

import mlx.core as mx
import numpy as np

from hf_models import needs_smollm2
from mlx_specstream import load, stream_generate
from mlx_specstream.sample import SamplingParams


def rows(rs):
    return np.concatenate([np.array(r.logprobs) for r in rs if r.tokens]), [t for r in rs for t in r.tokens]


def test_tree_logprobs_equal_plain_decodings_and_drafts_are_marked():
    model, tok = load()  # the embedded default model and its streams
    prompt = "def add(a, b):\n    return a + b\n\ndef sub(a, b):"
    plain = list(stream_generate(model, tok, prompt, max_tokens=40, speculative=False))
    spec = list(stream_generate(model, tok, prompt, max_tokens=40, tree=((0,), (1,), (0, 0)), lookup=5))
    (lp_plain, t_plain), (lp_spec, t_spec) = rows(plain), rows(spec)
    assert t_spec == t_plain and lp_spec.shape == lp_plain.shape == (40, model.args.vocab_size)
    np.testing.assert_allclose(lp_spec, lp_plain, atol=1e-4)
    assert np.allclose(np.exp(lp_spec).sum(-1), 1, atol=1e-4)
    assert [int(np.argmax(r)) for r in lp_spec] == t_spec  # greedy: every token is its row's argmax
    drafted = [f for r in spec for f in r.from_draft]
    assert len(drafted) == 40 and sum(drafted) > 0  # speculation accepted some drafts...
    for r in spec[:-1]:  # a whole step: its accepted drafts, then its correction token
        assert r.from_draft == [True] * (len(r.tokens) - 1) + [False]
    assert not any(f for r in plain for f in r.from_draft)  # ...plain decoding none


def test_sampled_tree_logprobs_are_the_untempered_targets():
    model, tok = load()
    mx.random.seed(0)
    rs = list(
        stream_generate(
            model, tok, "import os\n", max_tokens=24, sampling=SamplingParams(temp=0.7), tree=((0,), (1,)), lookup=3
        )
    )
    lp, toks = rows(rs)
    ref = np.array(model.base(mx.array([tok.encode("import os\n") + toks]))[0].astype(mx.float32))
    ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    n = len(tok.encode("import os\n"))
    np.testing.assert_allclose(lp, ref[n - 1 : n - 1 + len(toks)], atol=1e-3)


TEXT = "def f(x):\n    return x  # naïve café, 東京 🙂\n\n  two  spaces"


def joined(tok) -> str:
    from mlx_specstream.tokenizer import token_bytes

    return b"".join(token_bytes(tok, t) for t in tok.encode(TEXT, add_special_tokens=False)).decode()


def test_token_bytes_join_to_the_text_sentencepiece():
    assert joined(load()[1]).strip() == TEXT.strip()


@needs_smollm2
def test_token_bytes_join_to_the_text_byte_level_bpe():
    assert joined(load("smollm2", streams=False)[1]) == TEXT
