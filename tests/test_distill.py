"""The self-distillation data step: prompts from stdlib functions with modules held out, and
batched generation giving the tokens one-at-a-time greedy decoding gives."""

import mlx.core as mx

from mlx_specstream import load
from mlx_specstream.convert import mlx_lm_model
from mlx_specstream.decode import generate_step
from mlx_specstream.distill import answer, instructions
from mlx_specstream.stdlib_data import split_files, stdlib_root


def test_instructions_come_from_the_given_modules_only():
    train, valid = split_files()
    msgs = instructions(train, 40, seed=1)
    assert len(msgs) == 40 and len(set(msgs)) == 40
    held_out = {p.relative_to(stdlib_root()).parts[0].removesuffix(".py") for p in valid}
    named = {m.split("`")[1].split(".")[0] for m in msgs if m.startswith("Explain")}
    assert named and not named & held_out
    assert instructions(train, 40, seed=1) == msgs  # seeded


def test_batched_answers_equal_one_at_a_time_greedy(hf_model):
    path = hf_model("llama")[0]
    model, tok = load(str(path), streams=False)
    msgs = ["def add(a, b):", "import os\n", "class Foo:\n    def", "x = [1, 2, 3]\nfor i in x:"]
    recs = answer(mlx_lm_model(path, "float32"), tok, msgs, max_tokens=12, batch_size=3, log=lambda *_: None)
    assert len(recs) == 4
    for m, r in zip(msgs, recs):
        assert r["prompt_ids"] == tok.encode(m)
        ref = [t for t, _ in generate_step(mx.array(r["prompt_ids"]), model, max_tokens=12)]
        eos = next((i for i, t in enumerate(ref) if t in tok.eos_token_ids), len(ref))
        assert r["completion_ids"] == ref[:eos]


def test_distill_writes_as_it_goes_and_resumes(hf_model, tmp_path):
    from mlx_specstream.distill import main

    model = str(hf_model("llama")[0])
    args = ["--model", model, "--out", str(tmp_path), "--n-valid", "2", "--max-tokens", "4", "--batch-size", "4"]
    assert main(args + ["--n-train", "6"]) == 0
    first = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(first) == 6 and len((tmp_path / "valid.jsonl").read_text().splitlines()) == 2
    assert main(args + ["--n-train", "10"]) == 0  # more prompts: only the missing ones are answered
    again = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(again) == 10 and again[:6] == first
    assert len((tmp_path / "valid.jsonl").read_text().splitlines()) == 2
