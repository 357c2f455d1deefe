import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import mlx.core as mx  # noqa: E402

from hf_models import VOCAB, make_hf_model  # noqa: E402


def _corpus() -> str:
    import json as _json  # any stdlib sources will do: real text, present on every machine

    root = Path(_json.__file__).parent.parent
    files = sorted(root.glob("*.py"))[:40]
    return "\n".join(f.read_text(errors="ignore") for f in files)


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory) -> Path:
    """A tiny sentencepiece model (VOCAB pieces) trained on stdlib sources."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    text = d / "corpus.txt"
    text.write_text(_corpus())
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(d / "tokenizer"),
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        input_sentence_size=200000,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=2,
        minloglevel=2,
    )
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory, sp_model_file):
    """Factory: ``hf_model(name) -> (path, torch_model)``, one tiny HF checkpoint per name,
    with the tiny sentencepiece tokenizer beside it."""
    import shutil

    made = {}

    def get(name: str, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(name)
            model = make_hf_model(name, path, **kw)
            shutil.copy(sp_model_file, path / "tokenizer.model")
            made[key] = (path, model)
        return made[key]

    return get


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)


@pytest.fixture(autouse=True, scope="session")
def _optimised_blas():
    """Decode defaults depend on the BLAS MLX uses (see loading.load); tests run the same on every
    machine as if on the one the shipped settings were tuned on. The reference-BLAS behaviour
    has its own test (test_default_model.py)."""
    import mlx_specstream.loading as loading

    here = {"backend": "cpu", "device": "AMD EPYC", "blas": "openblas"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "blas_kind", lambda: "openblas")
        mp.setattr(loading, "tuned_on", lambda: here)
        yield


@pytest.fixture
def notices():
    """The notices (``mlx_specstream.errors.Notice``) issued during a test, as users see them:
    once per message and place."""
    import warnings

    from mlx_specstream.errors import Notice

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("default", Notice)
        yield lambda: [str(w.message) for w in got if issubclass(w.category, Notice)]
