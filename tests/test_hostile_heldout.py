"""The hardening issue's held-out pass: new hostile inputs of each class it names (not its own
examples), written after its fixes. Each is a named error, never a traceback, a hang or a
silent acceptance; what they found the first time is fixed and kept here."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mlx_specstream.checkpoint import load_model
from mlx_specstream.errors import UserError

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "mlx_specstream", "assets", "default")


def _cli(*args, timeout=120):
    r = subprocess.run(
        [sys.executable, "-m", "mlx_specstream.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    return r.returncode, r.stderr


@pytest.mark.parametrize(
    "change,named",
    [
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),  # accepted as truthy before
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "low_freq_factor",
        ),  # accepted before
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 0,
                }
            },
            "original_max_position_embeddings",
        ),
        ({"sliding_window": -3}, "sliding_window"),  # accepted before
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": float("inf")}}, "factor"),
    ],
)
def test_new_config_nonsense_is_named(hf_model, tmp_path, change, named):
    d = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UserError, match=named):
        load_model(d)


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "generation_config.json"]
)
@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_tokenizer_files_that_are_not_regular_files_are_named(tmp_path, name, kind):
    """A FIFO tokenizer_config.json was a traceback (a directory tokenizer.json an errno line)."""
    from mlx_specstream import load

    d = tmp_path / "m"
    shutil.copytree(DEFAULT, d)
    (d / name).unlink(missing_ok=True)
    os.mkfifo(d / name) if kind == "fifo" else (d / name).mkdir()
    with pytest.raises(UserError, match=f"regular files: {name}"):
        load(str(d))


def test_new_trainer_and_bench_flags_are_named(tmp_path):
    """``--name ../evil`` and ``--iters 10**10`` were tracebacks; ``bench --max-tokens -1`` hung."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 20}) + "\n")
    for extra, named in [
        (["--name", "../evil"], "adapter name"),
        (["--name", ""], "adapter name"),
        (["--iters", str(10**10)], "--iters must be an integer in 1.."),
    ]:
        rc, err = _cli("train", "--data", str(data), "--out", str(tmp_path / "o"), *extra)
        assert rc == 1 and named in err and "Traceback" not in err, err[-500:]
    assert not (tmp_path / "evil.json").exists() and not list(tmp_path.glob("speculative_streams*"))
    for extra, named in [
        (["--max-tokens", "-1"], "--max-tokens"),
        (["--trials", "0"], "--trials"),
        (["--n-prompts", "0"], "--n-prompts"),
        (["--temp", "nan"], "--temp"),
        (["--lookup", "-1"], "--lookup"),
    ]:
        rc, err = _cli("bench", "--quick", *extra, timeout=60)
        assert rc == 1 and named in err and "Traceback" not in err, err[-500:]
