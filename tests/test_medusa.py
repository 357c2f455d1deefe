import json

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from mlx_specstream.decode import generate_step, tree_generate_step
from mlx_specstream.generate import stream_generate
from mlx_specstream.drafters import DraftedModel, MedusaConfig, MedusaDrafter, MedusaHeads, save_medusa
from mlx_specstream.trainer import TrainConfig, read_jsonl, train
from mlx_specstream.tree import cartesian
from mlx_specstream import load
from mlx_specstream.checkpoint import load_model


@pytest.mark.parametrize("name,k,tree", [("llama", 3, None), ("qwen3", 2, cartesian(2, 3)), ("phi", 4, None)])
def test_medusa_greedy_equals_plain_greedy(hf_model, name, k, tree):
    model, _ = load_model(hf_model(name)[0])
    heads = MedusaHeads(MedusaConfig(num_heads=k), model)
    heads.init_from_lm_head(model)
    mx.random.seed(0)
    heads.update(tree_map(lambda p: p + mx.random.normal(p.shape) * 0.05, heads.parameters()))
    prompt = mx.array([1, 40, 7, 300, 22])
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=120)]
    out, steps = [], 0
    for r in tree_generate_step(prompt, model, MedusaDrafter(heads), max_tokens=120, tree=tree):
        out += r.tokens
        steps += 1
    assert out[:120] == ref and steps < 120


def test_medusa_param_count_and_training(hf_model, tmp_path):
    model, tok = load(str(hf_model("llama")[0]))
    heads = MedusaHeads(MedusaConfig(num_heads=3), model)
    assert heads.num_params == heads.expected_num_params(model) == 3 * (64 * 64 + 64 + 64 * 512)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "x = 1\ny = 2\n" * 6}) + "\n" for _ in range(16)))
    d = read_jsonl(data, tok, 40)
    cfg = TrainConfig(iters=15, batch_size=4, seq_len=40, lr=5e-3, warmup=2, medusa=3, val_every=15)
    _, hist = train(model, tok, d, d, cfg, tmp_path / "out", log=lambda *_: None)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert (tmp_path / "out" / "medusa_heads.json").exists()


def test_medusa_model_through_stream_generate(hf_model, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], d)
    base, _ = load_model(d)
    heads = MedusaHeads(MedusaConfig(num_heads=2), base)
    heads.init_from_lm_head(base)
    save_medusa(d, heads)
    model, tok = load(str(d), medusa=True)
    assert isinstance(model, DraftedModel) and isinstance(model.drafter, MedusaDrafter)
    a = "".join(r.text for r in stream_generate(model, tok, "def", max_tokens=40))
    b = "".join(r.text for r in stream_generate(model, tok, "def", max_tokens=40, speculative=False))
    assert a == b
