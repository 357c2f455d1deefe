"""Rebuild the embedded default model end to end (one command, CPU only, offline):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python recipes/build_default.py --work build/default

Stages (each skipped when its output exists; ``--force STAGE`` redoes one):
  pretrain  PyTorch: sentencepiece tokenizer + Llama base trained from scratch on stdlib sources
            (recipes/pretrain_torch.py), saved as a transformers checkpoint
  convert   transformers checkpoint -> MLX float16 in mlx_specstream/assets/default
  distill   the base's own greedy continuations of stdlib-train prompts (self-distillation data)
  streams   `specstream train --mode lossless` (γ=3, Ns=1, LoRA r16) -> speculative_streams.* next
            to the base, then `specstream bench tune --write` fits tree, context drafts and τ to
            this machine (on the stdlib held-out modules, never the evaluation prompts)
  shared    `specstream train --mode shared` (γ=3, Ns=1, LoRA r16) -> speculative_streams-shared.*
  medusa    `specstream train --medusa 3` -> WORK/medusa (baseline, not shipped)
  draft     a 2-layer draft model, same tokenizer and recipe -> mlx_specstream/assets/draft
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ASSETS = ROOT / "mlx_specstream" / "assets"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def convert(hf_dir: Path, dst: Path, tokenizer: Path):
    import mlx.core as mx

    from mlx_specstream.checkpoint import load_model, save_model

    model, cfg = load_model(hf_dir, dtype=mx.float16)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg["torch_dtype"] = "float16"
    save_model(tmp, model, cfg)
    shutil.copy(tokenizer, tmp / "tokenizer.model")
    (tmp / "model.safetensors.index.json").unlink(missing_ok=True)  # single small shard
    keep = [p for p in dst.glob("speculative_streams*")] if dst.exists() else []
    for p in keep:
        shutil.copy(p, tmp / p.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def distill(
    model_dir: Path, out: Path, n_train: int, n_valid: int, prompt_len: int, gen_len: int, batch: int, seed: int
):
    """Greedy continuations of random stdlib windows: the targets streams should learn to draft."""
    import mlx.core as mx
    import numpy as np

    from mlx_specstream.cache import make_cache
    from mlx_specstream import load
    from mlx_specstream.stdlib_data import read, split_files

    model, tok = load(str(model_dir), streams=False, dtype="float32")
    rng = random.Random(seed)
    train_files, valid_files = split_files()
    out.mkdir(parents=True, exist_ok=True)
    for name, files, n in (("train", train_files, n_train), ("valid", valid_files, n_valid)):
        docs = [tok.encode(t, add_special_tokens=False) for t in read(files)]
        docs = [d for d in docs if len(d) > prompt_len + 8]
        tic = time.time()
        with open(out / f"{name}.jsonl", "w") as f:
            for s in range(0, n, batch):
                prompts = []
                for _ in range(min(batch, n - s)):
                    d = rng.choice(docs)
                    i = rng.randrange(0, len(d) - prompt_len)
                    prompts.append([tok.bos_token_id] + d[i : i + prompt_len])
                x = mx.array(prompts)
                cache = make_cache(model)
                y = mx.argmax(model(x, cache=cache)[:, -1], axis=-1)
                gen = [y]
                for _ in range(gen_len - 1):
                    y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
                    gen.append(y)
                    if len(gen) % 16 == 0:
                        mx.eval(gen)
                g = np.array(mx.stack(gen, axis=1))
                for p, c in zip(prompts, g.tolist()):
                    f.write(json.dumps({"prompt_ids": p, "completion_ids": c}) + "\n")
                print(f"distill {name}: {s + len(prompts)}/{n} ({time.time() - tic:.0f}s)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="build/default")
    ap.add_argument("--pretrain-minutes", type=float, default=45)
    ap.add_argument("--draft-minutes", type=float, default=10)
    ap.add_argument("--stream-iters", type=int, default=1000)
    ap.add_argument("--shared-iters", type=int, default=500)
    ap.add_argument("--medusa-iters", type=int, default=300)
    ap.add_argument("--distill", type=int, default=2048, help="self-distillation sequences")
    ap.add_argument("--force", action="append", default=[])
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = ASSETS / "default"
    times = json.loads((work / "times.json").read_text()) if (work / "times.json").exists() else {}

    def stage(name, done: bool):
        return name in args.force or not done

    def timed(name, fn):
        tic = time.time()
        fn()
        times[name] = round((time.time() - tic) / 60, 1)
        (work / "times.json").write_text(json.dumps(times, indent=1))
        print(f"== {name}: {times[name]} min", flush=True)

    py = sys.executable
    if stage("pretrain", (work / "hf_base").exists()):
        timed(
            "pretrain",
            lambda: run([py, HERE / "pretrain_torch.py", "--out", work, "--minutes", args.pretrain_minutes], cwd=HERE),
        )
    if stage("convert", (base / "config.json").exists()):
        timed("convert", lambda: convert(work / "hf_base", base, work / "tokenizer.model"))
    if stage("distill", (work / "distill" / "train.jsonl").exists()):
        timed("distill", lambda: distill(base, work / "distill", args.distill, 128, 64, 192, 64, 0))
    common = [
        "--data",
        work / "distill",
        "--seq-len",
        "256",
        "--batch-size",
        "8",
        "--val-every",
        "100",
        "--val-batches",
        "4",
        "--save-every",
        "100",
    ]
    # Stream adapters: (stage, mode, iterations, γ, Ns, LoRA rank, name of the shipped file next to the base).
    # Lossless: one MSA layer — on this CPU every stream row costs real compute, and Ns=1 reached
    # the validation loss of Ns=4 at a quarter of the stream rows.
    for name, mode, iters, g, ns, rank, stem in (
        ("streams", "lossless", args.stream_iters, 3, 1, 16, "speculative_streams"),
        ("shared", "shared", args.shared_iters, 3, 1, 16, "speculative_streams-shared"),
    ):
        if stage(name, (base / f"{stem}.json").exists()):
            timed(
                name,
                lambda: run(
                    [
                        py,
                        "-m",
                        "mlx_specstream",
                        "train",
                        "--model",
                        base,
                        "--out",
                        work / mode,
                        "--mode",
                        mode,
                        "--num-streams",
                        g,
                        "--msa-layers",
                        ns,
                        "--lora-rank",
                        rank,
                        "--iters",
                        iters,
                        "--lr",
                        "2e-3",
                        *common,
                    ],
                    cwd=ROOT,
                ),
            )
            for ext in ("json", "safetensors"):
                shutil.copy(work / mode / f"speculative_streams.{ext}", base / f"{stem}.{ext}")
            if mode == "lossless":
                timed(
                    "tune",
                    lambda: run(
                        [
                            py,
                            "-m",
                            "mlx_specstream",
                            "bench",
                            "tune",
                            "--model",
                            base,
                            "--write",
                            "--json",
                            work / "tune.json",
                        ],
                        cwd=ROOT,
                    ),
                )
    if stage("medusa", (work / "medusa" / "medusa_heads.json").exists()):
        timed(
            "medusa",
            lambda: run(
                [
                    py,
                    "-m",
                    "mlx_specstream",
                    "train",
                    "--model",
                    base,
                    "--out",
                    work / "medusa",
                    "--medusa",
                    "3",
                    "--iters",
                    args.medusa_iters,
                    "--lr",
                    "1e-3",
                    *common,
                ],
                cwd=ROOT,
            ),
        )
    if stage("draft", (ASSETS / "draft" / "config.json").exists()):

        def draft():
            run(
                [
                    py,
                    HERE / "pretrain_torch.py",
                    "--out",
                    work,
                    "--size",
                    "draft",
                    "--minutes",
                    args.draft_minutes,
                    "--lr",
                    "3e-3",
                ],
                cwd=HERE,
            )
            convert(work / "hf_draft", ASSETS / "draft", work / "tokenizer.model")

        timed("draft", draft)
    print(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
