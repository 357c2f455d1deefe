"""Self-distillation data for stream training, made offline: chat prompts written from the Python
standard library (every machine has it; whole modules held out for validation), answered by the
frozen model itself in batches (mlx-lm's batched generation), so the streams learn what the model
will say.

    python -m mlx_specstream.distill --model smollm2 --out data/ --n-train 3000 --n-valid 200
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

from mlx_lm.generate import batch_generate

from .chat_template import template_ids
from .cli import progress_bar
from .convert import mlx_lm_model
from .loading import load, resolve_model
from .stdlib_data import parse_source, split_files, stdlib_root

DOC_CHARS = 360  # prompts stay short: prefill of long prompts dominated the generation time
TEMPLATES = (
    "Explain what the Python function `{qual}` does:\n\n{doc}",
    "Write a Python function `{name}{sig}` that does the following: {first}",
    "Summarize this documentation in two sentences:\n\n{doc}",
    "Give an example of how to use `{qual}` in Python.",
    "Continue this Python code:\n\n```python\n{src}\n```",
)


def _functions(path: Path) -> Iterator[Dict[str, str]]:
    if (parsed := parse_source(path)) is None:
        return
    text, tree = parsed
    lines = text.splitlines()
    rel = path.relative_to(stdlib_root()).with_suffix("").parts if path.is_relative_to(stdlib_root()) else (path.stem,)
    module = ".".join(p for p in rel if p != "__init__")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            src = "\n".join(lines[node.lineno - 1 : min(node.lineno + 7, len(lines))])
            yield {
                "name": node.name,
                "qual": f"{module}.{node.name}",
                "sig": f"({args})",
                "doc": doc[:DOC_CHARS],
                "first": doc.strip().splitlines()[0][:DOC_CHARS],
                "src": src,
            }


def instructions(files: Sequence[Path], n: int, seed: int = 0) -> List[str]:
    """``n`` user messages built from the functions (with docstrings) of ``files``."""
    rng = random.Random(seed)
    funcs = [f for p in files for f in _functions(p)]
    rng.shuffle(funcs)
    out = []
    for i, f in enumerate(funcs):
        if len(out) >= n:
            break
        out.append(TEMPLATES[i % len(TEMPLATES)].format(**f))
    return out


def answer(
    lm_model, tokenizer, messages: Sequence[str], *, max_tokens: int, batch_size: int, log=print, on_batch=None
) -> List[dict]:
    """Greedy answers in batches by mlx-lm's batched generation (``lm_model``: mlx-lm's model of
    the weights): ``{"prompt_ids", "completion_ids"}`` records (chat template applied, the
    answer without the EOS). ``on_batch(records)`` receives each batch as it is done."""
    prompts = [
        template_ids(tokenizer, [{"role": "user", "content": m}], add_generation_prompt=True)
        if tokenizer.has_chat_template
        else tokenizer.encode(m)
        for m in messages
    ]
    records, tic = [], time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s : s + batch_size]
        res = batch_generate(lm_model, tokenizer, batch, max_tokens=max_tokens, return_token_ids=True)
        new = [{"prompt_ids": list(p), "completion_ids": [int(t) for t in ids]} for p, ids in zip(batch, res.token_ids)]
        records += new
        if on_batch is not None:
            on_batch(new)
        n = sum(len(r["completion_ids"]) for r in records)
        log(
            f"{progress_bar(len(records), len(prompts))} {len(records)}/{len(prompts)} prompts, "
            f"{n} tokens, {n / (time.perf_counter() - tic):.0f} tok/s"
        )
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-valid", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--prompts",
        default=None,
        metavar="FILE.json",
        help='user messages to answer instead of the stdlib ones: {"train": [...], "valid": [...]} '
        "(e.g. written by --write-prompts on another machine: the stdlib differs between Pythons)",
    )
    ap.add_argument(
        "--write-prompts",
        default=None,
        metavar="FILE.json",
        help="write the stdlib user messages to FILE.json and stop",
    )
    ap.add_argument(
        "--dtype", default="float32", help="weights' dtype for answering (float32: the model's own answers)"
    )
    args = ap.parse_args(argv)
    if args.prompts:
        given = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
        if not (
            isinstance(given, dict)
            and all(
                isinstance(given.get(k, []), list) and all(isinstance(m, str) for m in given.get(k, []))
                for k in ("train", "valid")
            )
        ):
            raise SystemExit(f'{args.prompts}: expected {{"train": [strings], "valid": [strings]}}')
        messages = {k: given.get(k, [])[:n] for k, n in (("train", args.n_train), ("valid", args.n_valid))}
    else:
        train_files, valid_files = split_files()
        messages = {
            "train": instructions(train_files, args.n_train, args.seed),
            "valid": instructions(valid_files, args.n_valid, args.seed),
        }
    if args.write_prompts:
        Path(args.write_prompts).write_text(json.dumps(messages), encoding="utf-8")
        print(
            f"wrote {len(messages['train'])} train and {len(messages['valid'])} valid messages to {args.write_prompts}"
        )
        return 0
    _, tok = load(args.model, streams=False)
    lm_model = mlx_lm_model(resolve_model(args.model), args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("valid", "train"):
        file = out / f"{name}.jsonl"
        done = sum(1 for line in open(file) if line.strip()) if file.exists() else 0  # resume where it stopped
        todo = messages[name][done:]
        print(f"{name}: {done} answered, {len(todo)} to go", flush=True)

        def append(recs, file=file):
            with open(file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)

        answer(
            lm_model,
            tok,
            todo,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            log=lambda m: print("\r" + m, end="", flush=True),
            on_batch=append,
        )
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
