"""Training text that every fresh machine has: the Python standard library's own sources.

Whole top-level modules/packages are held out for evaluation (every 10th by sorted name), so
evaluation prompts come from code the model never saw.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HOLDOUT_EVERY = 10


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _top_level(root: Path, p: Path) -> str:
    rel = p.relative_to(root)
    return rel.parts[0].removesuffix(".py")


def split_files(root: Path | None = None) -> Tuple[List[Path], List[Path]]:
    root = root or stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    tops = sorted({_top_level(root, p) for p in files})
    held = {t for i, t in enumerate(tops) if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2}
    train = [p for p in files if _top_level(root, p) not in held]
    valid = [p for p in files if _top_level(root, p) in held]
    return train, valid


def parse_source(path: Path) -> Optional[Tuple[str, ast.Module]]:
    """``(text, syntax tree)`` of a Python file, or None for one that does not read or parse."""
    try:
        text = path.read_text(encoding="utf-8")
        return text, ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def read(files: List[Path]) -> List[str]:
    out = []
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if t.strip():
            out.append(t)
    return out


def eval_prompts(n: int = 16, prompt_lines: int = 12, seed: int = 0) -> List[Dict[str, str]]:
    """Prompts cut from held-out modules: a function's header and first lines."""
    rng = random.Random(seed)
    _, valid = split_files()
    cands = []
    for text in read(valid):
        lines = text.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.lstrip().startswith("def ") and i + prompt_lines < len(lines):
                cands.append("".join(lines[max(0, i - 2) : i + prompt_lines]))
    rng.shuffle(cands)
    return [{"prompt": c} for c in cands[:n]]
