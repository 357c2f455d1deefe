import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_specstream.streams import SpeculativeStreams, StreamConfig
from mlx_specstream.streams.loss import LossWeights, stream_loss
from mlx_specstream.trainer import DataError, TrainConfig, read_jsonl, train
from mlx_specstream import load


@pytest.fixture
def tiny(hf_model, tmp_path):
    model, tok = load(str(hf_model("llama")[0]))
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": ("def f(x):\n    return x + %d\n" % (i % 4)) * 3}) + "\n")
        for i in range(8):
            f.write(json.dumps({"prompt": "# add\n", "completion": "def add(a, b):\n    return a + b\n"}) + "\n")
    return model, tok, read_jsonl(data, tok, 48), tmp_path


def test_loss_decreases_and_base_is_bit_identical(tiny):
    model, tok, data, tmp = tiny
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    cfg = TrainConfig(iters=25, batch_size=4, seq_len=48, lr=1e-2, warmup=3, val_every=25)
    _, hist = train(model, tok, data, data, cfg, tmp / "out", log=lambda *_: None)
    assert np.mean([h["loss"] for h in hist[-5:]]) < np.mean([h["loss"] for h in hist[:5]])
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), before[k])
    assert (tmp / "out" / "speculative_streams.json").exists()
    assert "stream1" in hist[-1]["valid"]


def test_segments_equal_unsegmented_loss(tiny):
    model, _, (toks, mask), _ = tiny
    s = SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2), model)
    mx.random.seed(1)
    s.update({"stream_embeddings": mx.random.normal(s.stream_embeddings.shape) * 0.1})
    t, m = mx.array(toks[:4]), mx.array(mask[:4])
    w = LossWeights(ntp=0.0, stream=0.1)
    a, ma = stream_loss(model, s, t, m, w, segment=1000)
    b, mb = stream_loss(model, s, t, m, w, segment=7)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    for k in ma:
        np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-5)


def test_prompt_completion_streams_only_on_completion(tiny):
    _, tok, _, tmp = tiny
    f = tmp / "pc.jsonl"
    f.write_text(json.dumps({"prompt": "abc", "completion": "def g():"}) + "\n")
    toks, mask = read_jsonl(f, tok, 32)
    n_prompt = len(tok.encode("abc"))
    assert mask[0, :n_prompt].sum() == 0 and mask[0, n_prompt:].sum() == len(
        tok.encode("def g():", add_special_tokens=False)
    )


def test_resume_continues_identically(tiny):
    model, tok, data, tmp = tiny
    cfg = TrainConfig(iters=8, batch_size=4, seq_len=48, lr=5e-3, warmup=2, save_every=4, val_every=100)
    full, _ = train(model, tok, data, None, cfg, tmp / "full", log=lambda *_: None)
    train(model, tok, data, None, cfg, tmp / "resumed", log=lambda *_: None, stop_at=4)  # "interrupted"
    resumed, _ = train(model, tok, data, None, cfg, tmp / "resumed", resume=True, log=lambda *_: None)
    for (k, a), (_, b) in zip(tree_flatten(full.parameters()), tree_flatten(resumed.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "line,msg",
    [
        ("{not json", "train.jsonl:2: not valid JSON"),
        ('{"foo": 1}', "train.jsonl:2: a record needs"),
        ('{"text": 5}', "train.jsonl:2: 'text' must be a string"),
        ("[1, 2]", "train.jsonl:2: expected a JSON object"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "train.jsonl:2: 'messages'"),
        ('{"prompt_ids": 5, "completion_ids": [1]}', "train.jsonl:2: 'prompt_ids' and 'completion_ids' must be lists"),
        ('{"prompt_ids": [1], "completion_ids": [true]}', "train.jsonl:2: token ids must be integers"),
        ('{"text": "a\\ud800b"}', "train.jsonl:2: .* lone surrogate"),
        ('{"prompt": "x", "completion": ["\\udfff"]}', "train.jsonl:2: .* lone surrogate"),
        ("[" * 100_000 + "]" * 100_000, "train.jsonl:2: JSON nested too deeply"),
        (b'{"text": "caf\xe9"}', r"train.jsonl:2: not UTF-8 \(byte 13"),
    ],
)
def test_malformed_records_name_the_line(tiny, line, msg):
    _, tok, _, tmp = tiny
    f = tmp / "bad" / "train.jsonl"
    f.parent.mkdir()
    line = line if isinstance(line, bytes) else line.encode()
    f.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=msg):
        read_jsonl(f, tok, 32)


@pytest.mark.parametrize("mode", ["lossless", "shared", "medusa"])
def test_cached_bottom_states_train_exactly_like_recomputing_them(tiny, mode):
    """The bottom N−Ns layers are frozen in every mode: computing their output once per sequence
    gives the same parameters as recomputing it every iteration (Medusa: the whole base's final
    states, with sampled positions as the streams have)."""
    model, tok, data, tmp = tiny
    stream = StreamConfig(num_streams=2, num_msa_layers=1, mode="lossless" if mode == "medusa" else mode, lora_rank=4)
    runs = []
    for cache in (True, False):
        cfg = TrainConfig(
            iters=6,
            batch_size=4,
            seq_len=48,
            lr=5e-3,
            warmup=2,
            val_every=6,
            streams=stream,
            mode=stream.mode,
            cache_bottom=cache,
            medusa=2 if mode == "medusa" else 0,
            max_stream_positions=8,
        )
        s, hist = train(model, tok, data, data, cfg, tmp / f"out-{mode}-{cache}", log=lambda *_: None)
        runs.append((dict(tree_flatten(s.parameters())), hist))
    (a, ha), (b, hb) = runs
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5, err_msg=k)  # summation order only
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], rel=1e-5)
    assert ha[-1]["valid"] == pytest.approx(hb[-1]["valid"], rel=1e-4)


def test_train_verb_never_overwrites(hf_model, tmp_path, capsys):
    """Output goes where the user said under the name they said; the package's own assets are
    never written; an existing adapter is only replaced with --force."""
    import shutil

    from mlx_specstream.checkpoint import default_model_path
    from mlx_specstream.cli import main

    model = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "def f(x):\n    return x\n" * 4}) + "\n" for _ in range(8)))
    base = [
        "train",
        "--data",
        str(data),
        "--iters",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "24",
        "--num-streams",
        "2",
        "--msa-layers",
        "1",
        "--val-every",
        "100",
    ]
    assets = sorted(p.name for p in default_model_path().iterdir())
    before = {p: p.read_bytes() for p in default_model_path().glob("speculative_streams*")}
    assert main(base) == 1 and "inside the installed package" in capsys.readouterr().err  # no --model, no --out
    assert sorted(p.name for p in default_model_path().iterdir()) == assets
    assert {p: p.read_bytes() for p in default_model_path().glob("speculative_streams*")} == before
    assert main(base + ["--model", str(model)]) == 0
    first = (model / "speculative_streams.safetensors").read_bytes()
    assert main(base + ["--model", str(model), "--seed", "1"]) == 1
    assert "exists" in capsys.readouterr().err and (model / "speculative_streams.safetensors").read_bytes() == first
    assert main(base + ["--model", str(model), "--name", "task-b", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "speculative_streams-task-b.json").exists()
    assert not (tmp_path / "o" / "speculative_streams.json").exists()
    assert main(base + ["--model", str(model), "--seed", "1", "--force"]) == 0
    assert (model / "speculative_streams.safetensors").read_bytes() != first
    heads = base + ["--model", str(model), "--medusa", "2", "--out", str(tmp_path / "h")]
    assert main(heads) == 0
    kept = (tmp_path / "h" / "medusa_heads.safetensors").read_bytes()
    assert main(heads + ["--seed", "3"]) == 1 and "medusa_heads.json exists" in capsys.readouterr().err
    assert (tmp_path / "h" / "medusa_heads.safetensors").read_bytes() == kept  # Medusa heads too: --force to replace


def test_a_training_set_without_targets_is_refused(tiny):
    _, tok, _, tmp = tiny
    f = tmp / "empty.jsonl"
    f.write_text("".join(json.dumps({"prompt": "def f():", "completion": ""}) + "\n" for _ in range(4)))
    with pytest.raises(DataError, match="no usable records"):
        read_jsonl(f, tok, 32)


def test_a_resumed_run_keeps_the_whole_history(tiny):
    model, tok, data, tmp = tiny
    cfg = TrainConfig(iters=6, batch_size=4, seq_len=48, lr=5e-3, warmup=2, save_every=3, val_every=100)
    train(model, tok, data, None, cfg, tmp / "r", log=lambda *_: None, stop_at=3)
    train(model, tok, data, None, cfg, tmp / "r", resume=True, log=lambda *_: None)
    hist = json.loads((tmp / "r" / "speculative_streams.train_history.json").read_text())
    assert [h["iter"] for h in hist] == [1, 2, 3, 4, 5, 6]
    logged = []  # resuming a finished run (a rerun recipe) computes nothing and keeps everything
    s = train(model, tok, data, None, cfg, tmp / "r", resume=True, log=logged.append)[0]
    assert (
        not any("bottom states" in m for m in logged)
        and json.loads((tmp / "r" / "speculative_streams.train_history.json").read_text()) == hist
    )
    assert s.config.base is not None


def test_a_killed_run_keeps_its_history_up_to_the_last_checkpoint(tiny):
    model, tok, data, tmp = tiny
    cfg = TrainConfig(iters=6, batch_size=4, seq_len=48, lr=5e-3, warmup=2, save_every=3, val_every=100)

    def killed(msg):
        if " 5/6 " in msg:
            raise KeyboardInterrupt  # as a kill would, between checkpoints

    with pytest.raises(KeyboardInterrupt):
        train(model, tok, data, None, cfg, tmp / "k", log=killed)
    assert [h["iter"] for h in json.loads((tmp / "k" / "speculative_streams.train_history.json").read_text())] == [
        1,
        2,
        3,
    ]
    train(model, tok, data, None, cfg, tmp / "k", resume=True, log=lambda *_: None)
    assert [h["iter"] for h in json.loads((tmp / "k" / "speculative_streams.train_history.json").read_text())] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]


def test_a_time_limit_ends_the_run_with_its_schedule_decayed_and_saved(tiny):
    model, tok, data, tmp = tiny
    cfg = TrainConfig(
        iters=100_000,
        batch_size=4,
        seq_len=48,
        lr=5e-3,
        warmup=2,
        save_every=100_000,
        val_every=100_000,
        min_lr_ratio=0.1,
        time_limit=1.0,
    )
    _, hist = train(model, tok, data, data, cfg, tmp / "t", log=lambda *_: None)
    assert 1 < len(hist) < 100_000
    assert hist[-1]["lr"] == pytest.approx(5e-4, rel=0.05)  # the cosine's end, reached by the clock
    assert "valid" in hist[-1]  # the last iteration is evaluated and saved like a finished run
    assert (tmp / "t" / "speculative_streams.json").exists()
    assert json.loads((tmp / "t" / "speculative_streams.trainer_state.json").read_text())["step"] == len(hist)


@pytest.mark.parametrize("medusa", [0, 2])
def test_kept_states_are_read_back_by_a_resumed_run(tiny, medusa):
    """--keep-states: the frozen layers' outputs land in the output folder once; a resumed run
    reads them (no recomputation) and trains exactly as an uninterrupted run; a damaged file is
    computed again."""
    from dataclasses import replace

    from mlx_specstream.trainer import bottom_states, kept_states, visited

    model, tok, data, tmp = tiny
    stream = StreamConfig(num_streams=2, num_msa_layers=1, lora_rank=4)
    cfg = TrainConfig(
        iters=6,
        batch_size=4,
        seq_len=48,
        lr=5e-3,
        warmup=2,
        save_every=3,
        val_every=100,
        streams=stream,
        keep_states=True,
        medusa=medusa,
        max_stream_positions=8,
    )
    out = tmp / f"k{medusa}"
    train(model, tok, data, None, cfg, out, log=lambda *_: None, stop_at=3)
    files = list(out.glob("states-*.npy"))
    assert len(files) == 1 and not list(out.glob("*.partial.npy"))
    logs = []
    resumed = train(model, tok, data, None, cfg, out, resume=True, log=logs.append)[0]
    assert any("read from" in m for m in logs) and not any("bottom states" in m for m in logs)
    ref = train(model, tok, data, None, replace(cfg, keep_states=False), tmp / f"ref{medusa}", log=lambda *_: None)[0]
    a, b = dict(tree_flatten(resumed.parameters())), dict(tree_flatten(ref.parameters()))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-5, err_msg=k)  # summation order only
    files[0].write_bytes(b"not an array")
    logs = []
    s = None if medusa else resumed
    which = visited(len(data[0]), cfg)  # the kept file holds the records the whole run reads
    part = (data[0][which], data[1][which])
    got = kept_states(model, s, part, 4, logs.append, out)
    assert any("computing it again" in m for m in logs)
    np.testing.assert_array_equal(got, bottom_states(model, s, part, 4, None))


def test_a_diverged_run_stops_with_an_error_and_saves_nothing(tiny):
    model, tok, data, tmp = tiny
    cfg = TrainConfig(iters=6, batch_size=4, seq_len=48, lr=1e-3, warmup=1, val_every=6, save_every=2)
    cfg.lr = float("nan")  # as a diverged run ends up (a NaN learning rate is refused by name up front)
    with pytest.raises(DataError, match="diverged at iteration 1"):
        train(model, tok, data, data, cfg, tmp / "out", log=lambda *_: None)
    assert not (tmp / "out" / "speculative_streams.safetensors").exists()


def test_an_adapter_with_non_finite_values_is_refused_at_load(hf_model, tmp_path):
    import shutil

    from mlx_specstream.checkpoint import CheckpointError
    from mlx_specstream.streams import load_streams, save_streams

    folder = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], folder)
    model, _ = load(str(folder), streams=False)
    s = SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1, lora_rank=4), model)
    s.lora[0]["mlp__up_proj"].lora_b = s.lora[0]["mlp__up_proj"].lora_b.at[1, 2].add(float("nan"))
    save_streams(folder, s)
    with pytest.raises(CheckpointError, match=r"lora\.0\.mlp__up_proj\.lora_b hold NaN"):
        load_streams(folder / "speculative_streams.json", model)


@pytest.mark.parametrize(
    "field,value",
    [
        ("batch_size", -1),
        ("batch_size", 0),
        ("val_every", 0),
        ("save_every", 0),
        ("grad_accum", 0),
        ("iters", 0),
        ("lr", float("nan")),
        ("lr", 0.0),
        ("warmup", -1),
        ("seq_len", 1),
        ("time_limit", float("inf")),
        ("embedding_lr", -1.0),
    ],
)
def test_nonsense_training_settings_are_named(field, value):
    """--batch-size -1 looped forever; --val-every 0, --save-every 0, --grad-accum 0 were tracebacks."""
    with pytest.raises(DataError, match=f"--{field.replace('_', '-')} must be"):
        TrainConfig(**{field: value})


def test_a_missing_validation_file_is_named(tiny, tmp_path):
    from argparse import Namespace

    from mlx_specstream.trainer import load_data

    _, tok, _, tmp = tiny
    with pytest.raises(DataError, match="--valid .*no such file"):
        load_data(Namespace(data=str(tmp / "train.jsonl"), valid=str(tmp / "nope.jsonl"), seq_len=48), tok)


def _params(streams):
    return {k: np.array(v) for k, v in tree_flatten(streams.parameters())}


def test_trainer_state_is_per_adapter_and_refuses_mismatches(tiny):
    """Two adapters trained into one folder keep their own states; --resume of an adapter without
    its state, or with another run shape, is refused by name (never a silent fresh start)."""
    from mlx_specstream.errors import UserError
    from mlx_specstream.streams import StreamConfig

    model, tok, data, tmp = tiny
    cfg = TrainConfig(iters=4, batch_size=4, seq_len=48, lr=5e-3, warmup=1, save_every=2, val_every=100)
    out = tmp / "two"
    train(model, tok, data, None, cfg, out, log=lambda *_: None, stop_at=2, name="a")
    a_state = json.loads((out / "speculative_streams-a.trainer_state.json").read_text())
    cfg_b = TrainConfig(iters=4, batch_size=4, seq_len=48, lr=1e-2, warmup=1, save_every=2, val_every=100, seed=7)
    train(model, tok, data, None, cfg_b, out, log=lambda *_: None, name="b")
    assert json.loads((out / "speculative_streams-a.trainer_state.json").read_text()) == a_state
    resumed, _ = train(model, tok, data, None, cfg, out, resume=True, log=lambda *_: None, name="a")
    full, _ = train(model, tok, data, None, cfg, tmp / "solo", log=lambda *_: None, name="a")
    for k, v in _params(full).items():  # continued from a's own state, not b's (summation order aside)
        np.testing.assert_allclose(_params(resumed)[k], v, atol=1e-5, rtol=1e-4)
    (out / "speculative_streams-b.trainer_state.json").unlink()
    with pytest.raises(UserError, match="exists but its trainer state"):
        train(model, tok, data, None, cfg, out, resume=True, log=lambda *_: None, name="b")
    other = TrainConfig(
        iters=6,
        batch_size=4,
        seq_len=48,
        lr=5e-3,
        warmup=1,
        save_every=2,
        val_every=100,
        streams=StreamConfig(num_streams=2),
    )
    with pytest.raises(UserError, match="num_streams"):
        train(model, tok, data, None, other, out, resume=True, log=lambda *_: None, name="a")


@pytest.mark.parametrize("kill_at", range(6))
def test_a_kill_at_any_point_of_a_save_leaves_adapter_and_state_whole(tiny, monkeypatch, kill_at):
    """A SIGKILL-like stop at each point of the second save — inside a file's write (before its
    rename) or between the files — leaves the previous adapter loadable and a resumed run ends
    equal to an uninterrupted one (up to the summation order of re-batched frozen states)."""
    import os

    from mlx_specstream.streams import load_streams

    model, tok, data, tmp = tiny
    cfg = TrainConfig(iters=6, batch_size=4, seq_len=48, lr=5e-3, warmup=1, save_every=2, val_every=100)
    full, _ = train(model, tok, data, None, cfg, tmp / "full", log=lambda *_: None)
    out = tmp / f"killed{kill_at}"
    real_replace, calls = os.replace, []

    def replace(a, b):
        calls.append(b)
        if len(calls) == 5 + kill_at + 1:  # the second save's (kill_at)-th file; 5 renames per save
            raise KeyboardInterrupt  # the temporary file is written, not yet renamed
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, data, None, cfg, out, log=lambda *_: None)
    monkeypatch.setattr(os, "replace", real_replace)
    load_streams(out / "speculative_streams.json", model)  # the adapter on disk is whole
    resumed, _ = train(model, tok, data, None, cfg, out, resume=True, log=lambda *_: None)
    for k, v in _params(full).items():  # the frozen states of a resumed run are batched otherwise: summation order
        np.testing.assert_allclose(_params(resumed)[k], v, atol=1e-5, rtol=1e-4)


def test_frozen_states_are_computed_for_the_records_the_run_reads_only(tiny, monkeypatch):
    """The frozen-state cache is bounded by the run (iters x batch), not the data set; training on
    it equals recomputing the states every iteration."""
    import mlx_specstream.trainer as trainer_mod

    model, tok, data, tmp = tiny
    sizes = []
    real = trainer_mod.bottom_states
    monkeypatch.setattr(
        trainer_mod, "bottom_states", lambda m, s, d, *a, **k: sizes.append(len(d[0])) or real(m, s, d, *a, **k)
    )
    cfg = TrainConfig(iters=2, batch_size=4, seq_len=48, lr=5e-3, warmup=1, save_every=2, val_every=100)
    cached, _ = train(model, tok, data, None, cfg, tmp / "c", log=lambda *_: None)
    assert len(data[0]) > 40 and sizes == [8]  # 2 iterations x 4 records, not the whole set
    plain, _ = train(
        model, tok, data, None, TrainConfig(**{**cfg.__dict__, "cache_bottom": False}), tmp / "p", log=lambda *_: None
    )
    for k, v in _params(plain).items():
        np.testing.assert_allclose(_params(cached)[k], v, rtol=1e-4, atol=1e-6)


def test_a_restricted_head_is_the_full_head_over_the_whole_vocabulary_and_cheaper_training_still_learns(tiny):
    """``head_sample``: the stream CE over the batch's targets plus sampled tokens. Over every
    token it is the full CE exactly; over a subset it is smaller (fewer competitors) and every
    target keeps its column. Training with it lowers the full-vocabulary validation CE."""
    from mlx_specstream.streams.loss import drawing_probabilities, head_vocabulary

    model, tok, (toks, mask), tmp = tiny
    V = model.args.vocab_size
    s = SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1), model)
    t, m = mx.array(toks[:4]), mx.array(mask[:4])
    w = LossWeights(ntp=0.0, stream=0.1, pruning=0.0)
    full, mf = stream_loss(model, s, t, m, w)
    every = head_vocabulary(np.arange(V), drawing_probabilities(np.ones(V, np.int64)), 0, 0)
    same, ms = stream_loss(model, s, t, m, w, vocab=every)
    np.testing.assert_allclose(float(same), float(full), rtol=1e-5)
    np.testing.assert_allclose(float(ms["top1_stream1"]), float(mf["top1_stream1"]))
    targets = np.array(toks[:4, 1:])[np.array(mask[:4, 1:]) > 0]
    ids, remap = head_vocabulary(targets, drawing_probabilities(np.ones(V, np.int64)), 16, 0)
    assert set(targets.tolist()) <= set(np.array(ids).tolist()) and len(np.array(ids)) < V
    assert (np.array(ids)[np.array(remap)[targets]] == targets).all()
    sub, _ = stream_loss(model, s, t, m, w, vocab=(ids, remap))
    assert float(sub) < float(full)
    cfg = TrainConfig(iters=25, batch_size=4, seq_len=48, lr=1e-2, warmup=3, val_every=25, head_sample=32, full_every=5)
    _, hist = train(model, tok, (toks, mask), (toks, mask), cfg, tmp / "sampled", log=lambda *_: None)
    base = stream_loss(model, SpeculativeStreams(StreamConfig(), model), t, m, LossWeights())[1]["stream1"]
    assert hist[-1]["valid"]["stream1"] < float(base)
    with pytest.raises(DataError, match="--head-sample"):
        TrainConfig(head_sample=-1)


def test_the_stream_embeddings_step_at_their_own_rate(tiny):
    """Adam steps ~lr per weight, far below the scale of the states the embeddings are added to:
    their rate is lr times that scale (or --embedding-lr), every other parameter's step unchanged."""
    from mlx_specstream.streams import bottom_forward
    from mlx_specstream.trainer import insertion_rms

    model, tok, data, tmp = tiny
    start = SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=2), model)
    init = {k: np.array(v) for k, v in tree_flatten(start.parameters())}
    moved = {}
    for scale in (1.0, 10.0, 0.0):
        s = SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=2), model)
        s.update(tree_map(mx.array, tree_unflatten(list(init.items()))))
        cfg = TrainConfig(iters=1, batch_size=4, seq_len=48, lr=1e-3, warmup=0, val_every=100, embedding_lr=scale)
        out, _ = train(model, tok, data, None, cfg, tmp / f"e{scale}", streams=s, log=lambda *_: None)
        moved[scale] = {k: np.array(v) - init[k] for k, v in tree_flatten(out.parameters())}
    e = "stream_embeddings"
    np.testing.assert_allclose(moved[10.0][e], 10 * moved[1.0][e], rtol=1e-4, atol=1e-9)
    for k in moved[1.0]:
        if k != e:
            np.testing.assert_allclose(moved[10.0][k], moved[1.0][k], atol=1e-7, err_msg=k)
    toks, mask = data
    h = np.array(bottom_forward(model, start, mx.array(toks[:4, :-1]), mask="causal", positions=mx.arange(48)))
    rms = np.sqrt((h**2).mean(-1))[mask[:4, 1:] > 0].mean()
    assert insertion_rms(model, start, data, 4) == pytest.approx(float(rms), rel=1e-5)
    auto = insertion_rms(model, start, data, 4)
    np.testing.assert_allclose(moved[0.0][e], auto * moved[1.0][e], rtol=1e-3, atol=1e-9)


def test_a_resumed_token_head_keeps_its_space(tiny):
    """The head's parameters fit either space, so a resume that switched it would train another
    function from the saved weights: refused by name; a manifest saved before the key reads the
    space from its adapter file."""
    model, tok, data, tmp = tiny

    def cfg(space):
        sc = StreamConfig(num_streams=2, num_msa_layers=2, token_head_rank=4, token_head_space=space)
        return TrainConfig(streams=sc, iters=4, batch_size=4, seq_len=48, save_every=2, val_every=100)

    train(model, tok, data, None, cfg("normed"), tmp / "h", log=lambda *_: None, stop_at=2)
    with pytest.raises(Exception, match="token_head_space"):
        train(model, tok, data, None, cfg("residual"), tmp / "h", resume=True, log=lambda *_: None)
    man = tmp / "h" / "speculative_streams.trainer_state.json"
    meta = json.loads(man.read_text())
    del meta["shape"]["token_head_space"]  # as session 15's manifests were written
    man.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="token_head_space"):
        train(model, tok, data, None, cfg("residual"), tmp / "h", resume=True, log=lambda *_: None)
    _, hist = train(model, tok, data, None, cfg("normed"), tmp / "h", resume=True, log=lambda *_: None)
    assert hist[-1]["iter"] == 4
