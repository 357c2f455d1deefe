"""Prompt sets: ``humaneval``, ``everyday`` and ``code-edit`` (held out from every training and
tuning generator: :mod:`.heldout`; what speed claims are reported on), ``heldout`` (stdlib modules
the default model never saw), ``sitepackages`` (real code from installed third-party packages),
``chat`` and ``code`` (user messages in the tokenizer's chat template, made by the same generator
as the SmolLM2 adapter's first training prompts — in-distribution: questions about held-out stdlib
functions; code from installed third-party packages to continue), ``random:LEN`` and ``.jsonl``
files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List

import mlx_lm
import numpy as np

from ..chat_template import template_ids
from ..distill import instructions
from ..stdlib_data import eval_prompts, split_files
from ..errors import UserError
from .heldout import CHAT_TEMPLATED, HELDOUT_SETS, heldout_prompts

CHAT_SETS = ("chat", "code") + CHAT_TEMPLATED


def builtin_prompts(name: str, n: int, max_chars: int = 600) -> List[str]:
    """``heldout``: functions from the stdlib modules the default model never saw;
    ``sitepackages``: real code from installed third-party packages (not the stdlib at all)."""
    rng = random.Random(0)
    if name in HELDOUT_SETS:
        return heldout_prompts(name, n)
    if name == "heldout":
        return [p["prompt"][-max_chars:] for p in eval_prompts(n)]
    if name == "sitepackages":
        root = Path(mlx_lm.__file__).parent.parent
        files = sorted(p for pkg in ("mlx_lm", "huggingface_hub", "numpy") for p in (root / pkg).rglob("*.py"))
        cands = []
        for f in files:
            lines = f.read_text(errors="ignore").splitlines(keepends=True)
            for i, line in enumerate(lines):
                if line.lstrip().startswith("def ") and i + 10 < len(lines):
                    cands.append("".join(lines[max(0, i - 2) : i + 10]))
        rng.shuffle(cands)
        return [c[-max_chars:] for c in cands[:n]]
    if name == "chat":  # stdlib modules held out of every training set; not the validation prompts (seed 0)
        return instructions(split_files()[1], n, seed=7)
    if name == "code":
        return [
            "Continue this Python code:\n\n```python\n" + c.strip("\n") + "\n```"
            for c in builtin_prompts("sitepackages", n, max_chars=400)
        ]
    raise UserError(
        f"unknown prompt set {name!r} (humaneval, everyday, code-edit, heldout, sitepackages, chat, code, random:LEN, or a .jsonl file)"
    )


def load_prompts(spec: str, n: int, tokenizer, vocab: int) -> List[List[int]]:
    if spec.startswith("random:"):
        length = int(spec.split(":")[1])
        rng = np.random.RandomState(0)
        return [rng.randint(3, vocab, size=length).tolist() for _ in range(n)]
    if spec.endswith(".jsonl"):  # {"prompt": text} as is, or {"messages": [...]} through the chat template
        out = []
        for ln, line in enumerate(Path(spec).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("messages"), list) and rec["messages"]:
                if not getattr(tokenizer, "has_chat_template", False):
                    raise UserError(f"{spec}:{ln}: 'messages' records need a tokenizer with a chat template")
                out.append(template_ids(tokenizer, rec["messages"], add_generation_prompt=True))
            elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                out.append(tokenizer.encode(rec["prompt"]))
            else:
                raise UserError(f"{spec}:{ln}: records need a 'prompt' string or a 'messages' list")
        return out[:n]
    texts = builtin_prompts(spec, n)
    if spec in CHAT_SETS and getattr(tokenizer, "has_chat_template", False):
        return [template_ids(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    return [tokenizer.encode(t) for t in texts]
