"""Pretrain the embedded default model (and its draft model) from scratch with PyTorch on CPU.

    python recipes/pretrain_torch.py --out build/default --minutes 40

Steps: stdlib sources -> sentencepiece BPE tokenizer -> Llama (transformers) trained on next-token
prediction -> HF checkpoint in OUT/hf (the PyTorch side), then converted to MLX float16 in
OUT/mlx. ``--draft`` trains the small draft model with the same tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from mlx_specstream.stdlib_data import read, split_files

TOKENIZER_ARGS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=0.9995,
    bos_id=1,
    eos_id=2,
    unk_id=0,
    pad_id=-1,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    allow_whitespace_only_pieces=True,
    split_digits=True,
    max_sentence_length=8192,
    input_sentence_size=2_000_000,
    shuffle_input_sentence=True,
)

SIZES = {
    # name: (layers, hidden, heads, kv_heads, intermediate)
    "base": (8, 256, 8, 4, 704),
    "draft": (2, 128, 4, 2, 352),
}


def train_tokenizer(out: Path, vocab: int) -> Path:
    import sentencepiece as spm

    train, _ = split_files()
    corpus = out / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(read(train)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab,
        num_threads=2,
        minloglevel=2,
        **TOKENIZER_ARGS,
    )
    corpus.unlink()
    return out / "tokenizer.model"


def tokenize(sp_file: Path, out: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    train, valid = split_files()
    for name, files in (("train", train), ("valid", valid)):
        ids = []
        for t in read(files):
            ids.append(sp.bos_id())
            ids.extend(sp.encode(t))
            ids.append(sp.eos_id())
        np.save(out / f"{name}.npy", np.array(ids, dtype=np.uint16))


def train_model(out: Path, size: str, vocab: int, minutes: float, seq: int, batch: int, lr: float, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    L, h, nh, nkv, inter = SIZES[size]
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=L,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    data = np.load(out / "train.npy").astype(np.int64)
    valid = np.load(out / "valid.npy").astype(np.int64)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = minutes * 60
    warmup = 100
    tic = time.time()
    step, tokens, log = 0, 0, []

    def batch_of(src, n):
        starts = rng.integers(0, len(src) - seq - 1, size=n)
        x = np.stack([src[s : s + seq + 1] for s in starts])
        return torch.from_numpy(x)

    def evaluate():
        model.eval()
        g = np.random.default_rng(123)
        with torch.no_grad():
            starts = g.integers(0, len(valid) - seq - 1, size=32)
            x = torch.from_numpy(np.stack([valid[s : s + seq + 1] for s in starts]))
            loss = model(x[:, :-1], labels=x[:, :-1].clone()).loss.item()
        model.train()
        return loss

    model.train()
    while True:
        elapsed = time.time() - tic
        if elapsed > budget:
            break
        frac = elapsed / budget  # schedule by wall-clock: warm-up, then cosine to 10%
        cur = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur
        x = batch_of(data, batch)
        loss = model(x[:, :-1], labels=x[:, :-1].clone()).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch * seq
        if step % 50 == 0:
            rec = {
                "step": step,
                "loss": round(loss.item(), 4),
                "lr": cur,
                "tok_s": round(tokens / (time.time() - tic)),
                "min": round((time.time() - tic) / 60, 1),
            }
            if step % 500 == 0:
                rec["valid_loss"] = round(evaluate(), 4)
            log.append(rec)
            print(json.dumps(rec), flush=True)
    hf_dir = out / f"hf_{size}"
    model.save_pretrained(hf_dir, safe_serialization=True)
    info = {
        "size": size,
        "params": n_params,
        "steps": step,
        "tokens": tokens,
        "minutes": round((time.time() - tic) / 60, 2),
        "valid_loss": evaluate(),
        "seq": seq,
        "batch": batch,
        "lr": lr,
        "seed": seed,
    }
    (hf_dir / "train_log.json").write_text(json.dumps({"info": info, "log": log}, indent=1))
    print(json.dumps(info), flush=True)
    return hf_dir


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/default")
    ap.add_argument("--size", default="base", choices=sorted(SIZES))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--minutes", type=float, default=40)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sp_file = out / "tokenizer.model"
    if not sp_file.exists():
        t = time.time()
        train_tokenizer(out, args.vocab)
        print(f"tokenizer: {time.time() - t:.0f}s", flush=True)
    if not (out / "train.npy").exists():
        t = time.time()
        tokenize(sp_file, out)
        print(f"tokenized: {len(np.load(out / 'train.npy'))} train tokens, {time.time() - t:.0f}s", flush=True)
    train_model(out, args.size, args.vocab, args.minutes, args.seq, args.batch, args.lr, args.seed)


if __name__ == "__main__":
    main()
