import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_specstream.streams import (
    SpeculativeStreams,
    StreamConfig,
    forward_with_streams,
    load_streams,
    msa_mask,
    save_streams,
)
from mlx_specstream import load
from mlx_specstream.checkpoint import CheckpointError, load_model
from mlx_specstream.drafters import StreamDrafter


def randomize(streams, scale=0.1, seed=0):
    mx.random.seed(seed)
    streams.update(tree_map(lambda p: mx.random.normal(p.shape) * scale, streams.parameters()))
    return streams


def test_msa_mask_by_hand():
    anc = mx.array([[1, 0], [1, 1]], dtype=mx.bool_)
    m = np.array(msa_mask(anc, mx.array([1]), 2, False)).astype(int)
    np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    m = np.array(msa_mask(anc, mx.array([1]), 2, True)).astype(int)
    np.testing.assert_array_equal(m[1], [1, 1, 1, 1])
    np.testing.assert_array_equal(m[0], [1, 0, 0, 0])


def test_msa_mask_tree_two_streams():
    # Root with two children (siblings): streams of child 2 see root and child 2 only.
    anc = mx.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=mx.bool_)
    m = np.array(msa_mask(anc, mx.arange(3), 2, False)).astype(int)
    assert m.shape == (9, 9)
    # rows 3..8: s(0,1) s(0,2) s(1,1) s(1,2) s(2,1) s(2,2)
    np.testing.assert_array_equal(m[7], [1, 0, 1, 0, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(m[8], [1, 0, 1, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(m[4], [1, 0, 0, 1, 1, 0, 0, 0, 0])
    assert m[:3, 3:].sum() == 0  # lossless: main never sees streams


@pytest.mark.parametrize("gamma,ns,rank", [(1, 1, 0), (3, 2, 8), (4, 3, 4)])
def test_extra_parameter_count(hf_model, gamma, ns, rank):
    model, _ = load_model(hf_model("llama")[0])
    s = SpeculativeStreams(StreamConfig(num_streams=gamma, num_msa_layers=ns, lora_rank=rank), model)
    h = model.args.hidden_size
    assert s.num_params == s.expected_num_params(model)
    if rank == 0:
        assert s.num_params == gamma * h + 16 * h
    else:
        # every Linear of an MSA layer: q,k,v,o (64->64, 64->32 x2, 64->64) and gate/up/down (64<->128)
        per_layer = rank * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
        assert s.num_params == gamma * h + 16 * h + ns * per_layer


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi", "opt"])
def test_lossless_main_logits_never_depend_on_streams(hf_model, name):
    model, _ = load_model(hf_model(name)[0])
    ids = mx.array([[1, 9, 40, 7, 300, 12, 5, 80]])
    base = model(ids)
    for seed in range(2):
        s = randomize(SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2), model), seed=seed)
        main, strm = forward_with_streams(model, s, ids)
        np.testing.assert_allclose(np.array(main), np.array(base), atol=1e-5)
        assert strm.shape == (1, 8, 3, base.shape[-1])


def test_shared_main_sees_streams_changes_main(hf_model):
    model, _ = load_model(hf_model("llama")[0])
    ids = mx.array([[1, 9, 40, 7, 300]])
    s = randomize(SpeculativeStreams(StreamConfig(mode="shared", main_sees_streams=True), model), scale=1.0)
    main, _ = forward_with_streams(model, s, ids)
    assert np.abs(np.array(main) - np.array(model(ids))).max() > 1e-3


def test_streams_on_chosen_positions_match_all_positions(hf_model):
    """Segment-style training forward: streams on a subset of rows give the same stream logits
    for those rows (streams never see other rows' streams)."""
    model, _ = load_model(hf_model("qwen2")[0])
    s = randomize(SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=2), model))
    ids = mx.array([[1, 9, 40, 7, 300, 12, 5]])
    _, all_ = forward_with_streams(model, s, ids)
    owners = mx.array([2, 5])
    _, some = forward_with_streams(model, s, ids, owners=owners)
    np.testing.assert_allclose(np.array(some), np.array(all_[:, owners]), atol=1e-5)


@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_first_streams_alone_equal_their_rows_among_all(hf_model, mode):
    """Stream j attends to streams <= j only: running the first g streams gives exactly their
    rows of the full γ run (what decoding relies on to skip streams a tree does not use)."""
    from mlx_specstream.streams import bottom_forward, msa_forward

    model, _ = load_model(hf_model("llama")[0])
    s = randomize(SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2, mode=mode), model))
    ids = mx.array([[1, 9, 40, 7, 300, 12]])
    L = ids.shape[1]
    pos = mx.arange(L)
    h = bottom_forward(model, s, ids, mask="causal", positions=pos)
    anc = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    m3, s3 = msa_forward(model, s, h, anc=anc, owners=pos, positions=pos)
    for g in (1, 2):
        mg, sg = msa_forward(model, s, h, anc=anc, owners=pos, positions=pos, num_streams=g)
        np.testing.assert_allclose(np.array(mg), np.array(m3), atol=1e-5)
        np.testing.assert_allclose(
            np.array(sg.reshape(1, L, g, -1)), np.array(s3.reshape(1, L, 3, -1)[:, :, :g]), atol=1e-5
        )


def test_stream_lora_applies_to_stream_rows_only(hf_model):
    model, _ = load_model(hf_model("llama")[0])
    ids = mx.array([[1, 9, 40, 7, 300, 12]])
    s = randomize(SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=2, lora_rank=4), model))
    main1, str1 = forward_with_streams(model, s, ids)
    s.lora[0]["self_attn__v_proj"].lora_b = s.lora[0]["self_attn__v_proj"].lora_b + 0.5
    main2, str2 = forward_with_streams(model, s, ids)
    np.testing.assert_array_equal(np.array(main1), np.array(main2))
    assert np.abs(np.array(str1) - np.array(str2)).max() > 1e-3


def test_stream_files_round_trip_and_swap(hf_model, tmp_path):
    import shutil

    src, _ = hf_model("llama")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    base, _ = load_model(d)
    a = randomize(SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1), base), seed=1)
    b = randomize(SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2), base), seed=2)
    save_streams(d, a)
    save_streams(d, b, name="task-b")
    model, _ = load(str(d))
    assert model.drafter.streams.config.num_streams == 2
    model_b, _ = load(str(d), streams="task-b")
    assert model_b.drafter.streams.config.num_streams == 3
    for k, v in tree_flatten(b.parameters()):
        np.testing.assert_allclose(
            np.array(dict(tree_flatten(model_b.drafter.streams.parameters()))[k]),
            np.array(v.astype(mx.float16)),
            atol=0,
        )
    # Swap adapters over the same base at run time.
    base_params = model.base.parameters()
    model.drafter = StreamDrafter(load_streams(d / "speculative_streams-task-b.json", model.base))
    assert model.drafter.streams.config.num_streams == 3 and model.base.parameters() is not None
    assert dict(tree_flatten(base_params)).keys() == dict(tree_flatten(model.base.parameters())).keys()
    plain, _ = load(str(d), streams=False)
    assert not hasattr(plain, "drafter")
    with pytest.raises(FileNotFoundError, match="task-c"):
        load(str(d), streams="task-c")


def test_bad_stream_files(hf_model, tmp_path):
    import json
    import shutil

    src, _ = hf_model("llama")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    base, _ = load_model(d)
    save_streams(d, SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1), base))
    cfg = json.loads((d / "speculative_streams.json").read_text())
    (d / "speculative_streams.json").write_text(json.dumps({**cfg, "num_streams": 3}))
    with pytest.raises(CheckpointError, match="stream_embeddings"):
        load(str(d))
    (d / "speculative_streams.json").write_text(json.dumps({**cfg, "flavour": 1}))
    with pytest.raises(CheckpointError, match="flavour"):
        load(str(d))
    (d / "speculative_streams.json").write_text(json.dumps({**cfg, "num_msa_layers": 99}))
    with pytest.raises(ValueError, match="exceeds"):
        load(str(d))
    with pytest.raises(ValueError, match="lossless"):
        StreamConfig(mode="lossless", main_sees_streams=True)
