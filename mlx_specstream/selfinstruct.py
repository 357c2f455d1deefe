"""Diverse self-distillation data, made offline and resumable: the model itself writes varied
user messages (self-instruct) from topics every machine has — Debian's package descriptions, man
page summaries, Python's help topics, English words from the tokenizer's own vocabulary — plus code
edits of standard-library functions and multi-turn follow-ups; then it answers them greedily.

    python -m mlx_specstream.selfinstruct --model smollm2 --out runs/selfinstruct --n 12000

Stages (each appends to its own file and resumes where it stopped; rerun the same command):
``messages.jsonl`` (the user messages), ``answers.jsonl`` (first turns answered),
``followups.jsonl`` (second turns written and answered). ``--pack DIR`` writes ``train.jsonl`` /
``valid.jsonl`` (``{"prompt_ids", "completion_ids"}``, what ``specstream train`` reads), dropping
every record that shares a word 8-gram with a bench prompt set (the held-out sets stay disjoint).
Validation records come from topics held out of training (every 20th by hash)."""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence

import mlx.core as mx
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler
from pydoc_data.topics import topics as help_topics

from .bench.heldout import held_out_texts
from .convert import mlx_lm_model
from .loading import load, resolve_model
from .stdlib_data import parse_source, split_files
from .tokenizer import chat_ids
from .sample import derived_seed

VALID_EVERY = 20
KINDS = (
    "explanation",
    "how-to question",
    "advice",
    "comparison",
    "short poem",
    "short story",
    "email to write",
    "math word problem",
    "request for code",
    "trivia question",
    "definition",
    "list of ideas",
    "summary request",
    "step-by-step instructions",
    "debugging question",
    "opinion question",
    "plan to make",
    "recipe",
    "letter to write",
    "history question",
)
# Few-shot openings for the message writer (completion, not chat: the 135M model continues a list
# far more reliably than it follows "write a question" instructions).
SHOTS = (
    "Messages that users sent to an AI assistant, with the topic and kind of each.\n\n"
    "Topic: houseplants\nKind: how-to question\nMessage: My fern keeps turning brown at the tips. What am I doing wrong?\n\n"
    "Topic: rsync - a fast, versatile, remote file-copying tool\nKind: request for code\nMessage: Write a shell "
    "command that copies my photos folder to a backup drive and skips files that did not change.\n\n",
    "Here are real requests people typed into a chatbot, sorted by topic.\n\n"
    "Topic: glaciers\nKind: explanation\nMessage: Why do glaciers look blue instead of white?\n\n"
    "Topic: budgeting\nKind: list of ideas\nMessage: Give me five cheap hobbies I could start this month.\n\n",
    "A sample of user messages from a help desk assistant's logs.\n\n"
    "Topic: train tickets\nKind: math word problem\nMessage: A ticket costs 14 euros and a child pays half. "
    "How much do two adults and three children pay?\n\n"
    "Topic: json - JSON encoder and decoder\nKind: debugging question\nMessage: json.dumps fails on my datetime "
    "objects with a TypeError. How do I fix it?\n\n",
)
EDITS = (
    "Add type hints to this function.",
    "Rewrite this function so that it is easier to read.",
    "Add a docstring to this function.",
    "Rename the variables in this function to clearer names.",
    "Make this function raise a ValueError on invalid input.",
    "Rewrite this function without using a loop.",
    "Add comments that explain each step of this function.",
    "Convert this function into a method of a class.",
    "Make this function handle None arguments.",
    "Simplify this function.",
    "Rewrite this function to use a for loop instead.",
    "Add logging to this function.",
)
FOLLOWUP_SHOT = (
    "Conversations between a user and an AI assistant. After the assistant answers, the user "
    "asks a short follow-up question about the answer.\n\n"
)


def _valid(topic: str) -> bool:
    return int(hashlib.sha1(topic.encode()).hexdigest(), 16) % VALID_EVERY == 0


def topics(tokenizer) -> List[str]:
    """Topic strings from what this machine has; deterministic for the same machine."""
    found = set()
    status = Path("/var/lib/dpkg/status")
    if status.exists():
        for block in status.read_text(errors="ignore").split("\n\n"):
            name = re.search(r"^Package: (\S+)", block, re.M)
            desc = re.search(r"^Description: (.+)", block, re.M)
            if name and desc:
                found.add(f"{name.group(1)} - {desc.group(1).strip()}")
    for page in sorted(Path("/usr/share/man").glob("man[1-8]/*.gz")):
        try:
            head = gzip.open(page).read(4096).decode("utf-8", "ignore")
        except (OSError, EOFError):
            continue
        m = re.search(r"\.SH\s+\"?NAME\"?\s*\n(.+?)\n", head)
        if m:
            line = re.sub(r"\\f[BIRP]|\\-|\\\(em|\\", lambda x: "-" if "-" in x.group() else "", m.group(1)).strip()
            if 10 < len(line) < 160 and " - " in line:
                found.add(line)
    found.update(f"Python's {t}" for t in help_topics)
    words = set()
    for tok in tokenizer.vocab if hasattr(tokenizer, "vocab") else tokenizer.get_vocab():
        w = tok[1:] if tok.startswith("Ġ") else None
        if w and w.isalpha() and w.islower() and 5 <= len(w) <= 14:
            words.add(w)
    found.update(words)
    return sorted(found)


def stdlib_functions(n: int, seed: int) -> List[str]:
    """Whole short functions (≤ 30 lines) from the stdlib modules used for training."""
    rng = random.Random(seed)
    out = []
    for path in split_files()[0]:
        if (parsed := parse_source(path)) is None:
            continue
        text, tree = parsed
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno < 30:
                body = lines[node.lineno - 1 : node.end_lineno]
                indent = min(len(ln) - len(ln.lstrip()) for ln in body if ln.strip())
                out.append("\n".join(ln[indent:] for ln in body))
    rng.shuffle(out)
    return out[:n]


def plan(tokenizer, n: int, seed: int) -> List[dict]:
    """The stage-1 jobs: ``{"id", "split", "kind", "topic", "edit"}`` — a message to write about a
    topic (85%), or a code edit of a stdlib function (15%, no writing needed)."""
    rng = random.Random(seed)
    pool = topics(tokenizer)
    funcs = stdlib_functions(n, seed)
    jobs = []
    for i in range(n):
        if funcs and rng.random() < 0.15:
            src = funcs[i % len(funcs)]
            jobs.append(
                {
                    "id": i,
                    "split": "valid" if _valid(src) else "train",
                    "kind": "code edit",
                    "topic": "",
                    "message": f"{rng.choice(EDITS)}\n\n```python\n{src}\n```",
                }
            )
        else:
            topic = rng.choice(pool)
            jobs.append(
                {
                    "id": i,
                    "split": "valid" if _valid(topic) else "train",
                    "kind": rng.choice(KINDS),
                    "topic": topic,
                    "shot": rng.randrange(len(SHOTS)),
                }
            )
    return jobs


def clean_message(text: str) -> str | None:
    """The first paragraph of a written message, or None when it is not a usable one."""
    msg = text.split("\n\n")[0].split("\nTopic:")[0].strip()
    if not 12 <= len(msg) <= 500 or re.search(r"^(Topic|Kind|Message):", msg, re.M):
        return None
    return msg


def _read(file: Path) -> List[dict]:
    if not file.exists():
        return []
    out = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: dropped, redone
            break
    return out


def _append(file: Path, records: Iterable[dict]) -> None:
    with open(file, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


class _StopAtNewline:
    """The tokenizer as ``batch_generate`` sees it, with every token holding a newline as a stop:
    a written message is one line, and generating past it cost most of the stage's time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.vocab if hasattr(tokenizer, "vocab") else tokenizer.get_vocab()
        self.eos_token_ids = set(tokenizer.eos_token_ids) | {i for t, i in vocab.items() if "Ċ" in t or "\n" in t}

    def decode(self, ids):
        return self.tokenizer.decode(ids)


def run(
    model,
    tokenizer,
    out: Path,
    jobs: List[dict],
    *,
    seed: int,
    batch_size: int,
    max_tokens: int,
    followup_every: int,
    chunk: int = 512,
    shard: tuple = (0, 1),
    log=print,
) -> None:
    """The three stages over the planned ``jobs``, ``chunk`` jobs at a time (so a stopped run leaves
    every kind of record, and a resumed one redoes nothing it wrote). ``shard=(k, m)`` takes the
    jobs whose id is k mod m, so m single-threaded processes share a machine (two of them here make
    ~1.5x the answers of one process on both cores: the BLAS threads spin)."""
    out.mkdir(parents=True, exist_ok=True)
    sampler, one_line = make_sampler(temp=0.8, top_p=0.95), _StopAtNewline(tokenizer)
    files = {k: out / f"{k}.jsonl" for k in ("messages", "answers", "followups")}
    have = {k: {r["id"] for r in _read(f)} for k, f in files.items()}
    msgs = {r["id"]: r for r in _read(files["messages"])}
    answered = {r["id"]: r for r in _read(files["answers"])}
    jobs = [j for j in jobs if j["id"] % shard[1] == shard[0]]
    tic, ntok = time.perf_counter(), 0

    def answer(convs):
        prompts = [chat_ids(tokenizer, c) for c in convs]
        res = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
        return prompts, [[int(t) for t in ids] for ids in res.token_ids]

    for c0 in range(0, len(jobs), chunk):
        part = jobs[c0 : c0 + chunk]
        # 1. messages: written by the model from a topic and a kind (sampled), or given (code edits)
        for batch in _batches([j for j in part if j["id"] not in have["messages"]], batch_size):
            recs = [dict(j, messages=[{"role": "user", "content": j["message"]}]) for j in batch if "message" in j]
            write = [j for j in batch if "message" not in j]
            if write:
                mx.random.seed(derived_seed(seed, write[0]["id"]))
                prompts = [
                    tokenizer.encode(SHOTS[j["shot"]] + f"Topic: {j['topic']}\nKind: {j['kind']}\nMessage:")
                    for j in write
                ]
                res = batch_generate(model, one_line, prompts, max_tokens=64, sampler=sampler)
                recs += [
                    dict(j, messages=[{"role": "user", "content": m}] if (m := clean_message(t)) else None)
                    for j, t in zip(write, res.texts)
                ]
            recs.sort(key=lambda r: r["id"])
            _append(files["messages"], recs)
            msgs.update((r["id"], r) for r in recs)
            have["messages"] |= {r["id"] for r in recs}
        # 2. first answers, greedy: what the model will say
        todo = [msgs[j["id"]] for j in part if j["id"] not in have["answers"] and msgs[j["id"]].get("messages")]
        for batch in _batches(todo, batch_size):
            prompts, ids = answer([r["messages"] for r in batch])
            recs = [
                {
                    "id": r["id"],
                    "split": r["split"],
                    "kind": r["kind"],
                    "messages": r["messages"],
                    "prompt_ids": p,
                    "completion_ids": c,
                }
                for r, p, c in zip(batch, prompts, ids)
            ]
            _append(files["answers"], recs)
            answered.update((r["id"], r) for r in recs)
            have["answers"] |= {r["id"] for r in recs}
            ntok += sum(map(len, ids))
            log(
                f"answers: {len(have['answers'])} ({len(have['messages'])}/{len(jobs)} planned jobs written), "
                f"{ntok / (time.perf_counter() - tic):.0f} answer tok/s overall"
            )
        # 3. follow-ups: every k-th conversation gets a second user turn, written and answered
        todo = [
            answered[j["id"]]
            for j in part
            if j["id"] % followup_every == 0
            and j["id"] in answered
            and j["id"] not in have["followups"]
            and answered[j["id"]]["completion_ids"]
        ]
        for batch in _batches(todo, batch_size):
            mx.random.seed(derived_seed(seed, 7 + batch[0]["id"]))
            convs = [
                r["messages"] + [{"role": "assistant", "content": tokenizer.decode(r["completion_ids"])}] for r in batch
            ]
            prompts = [
                tokenizer.encode(
                    FOLLOWUP_SHOT + f"User: {c[0]['content'][:600]}\nAssistant: {c[1]['content'][:600]}\nUser:"
                )
                for c in convs
            ]
            res = batch_generate(model, one_line, prompts, max_tokens=48, sampler=sampler)
            keep = [
                (r, c + [{"role": "user", "content": m}])
                for r, c, t in zip(batch, convs, res.texts)
                if (m := clean_message(t))
            ]
            recs = {
                r["id"]: {
                    "id": r["id"],
                    "split": r["split"],
                    "kind": "follow-up",
                    "messages": None,
                    "prompt_ids": [],
                    "completion_ids": [],
                }
                for r in batch
            }  # tried, kept or not
            if keep:
                prompts, ids = answer([c for _, c in keep])
                for (r, c), p, i in zip(keep, prompts, ids):
                    recs[r["id"]].update(messages=c, prompt_ids=p, completion_ids=i)
                ntok += sum(map(len, ids))
            _append(files["followups"], recs.values())
            have["followups"] |= set(recs)
            log(f"follow-ups: {len(have['followups'])}")


def ngrams(text: str, n: int = 8) -> set:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def pack(out: Path, dest: Path, held_out: Sequence[str]) -> Dict[str, int]:
    """``train.jsonl`` / ``valid.jsonl`` in ``dest`` from the answered stages, without any record
    whose messages share a word 8-gram with ``held_out`` (the bench's evaluation prompts)."""
    banned = set().union(*(ngrams(t) for t in held_out)) if held_out else set()
    dest.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "valid": 0, "dropped": 0}
    files = {s: open(dest / f"{s}.jsonl", "w", encoding="utf-8") for s in ("train", "valid")}
    try:
        folders = [out] + sorted(out.glob("shard*"))
        for rec in [r for d in folders for k in ("answers", "followups") for r in _read(d / f"{k}.jsonl")]:
            if not rec.get("completion_ids"):
                continue
            if banned and ngrams(" ".join(m["content"] for m in rec["messages"] if m["role"] == "user")) & banned:
                counts["dropped"] += 1
                continue
            files[rec["split"]].write(
                json.dumps({"prompt_ids": rec["prompt_ids"], "completion_ids": rec["completion_ids"]}) + "\n"
            )
            counts[rec["split"]] += 1
    finally:
        for f in files.values():
            f.close()
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", required=True, help="folder of the stages' files (resumed when it has them)")
    ap.add_argument("--n", type=int, default=12000, help="first-turn messages to plan")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--followup-every", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=512, help="jobs taken through all stages at a time")
    ap.add_argument(
        "--shard",
        default="0/1",
        metavar="K/M",
        help="this process's share of the jobs (id mod M == K), "
        "written to OUT/shardK (run M processes with OPENBLAS_NUM_THREADS=1)",
    )
    ap.add_argument("--pack", default=None, metavar="DIR", help="write train/valid.jsonl from the stages and stop")
    args = ap.parse_args(argv)
    if args.pack:
        print(pack(Path(args.out), Path(args.pack), held_out_texts()))
        return 0
    _, tok = load(args.model, streams=False)
    model = mlx_lm_model(resolve_model(args.model), "float32")
    k, m = (int(x) for x in args.shard.split("/"))
    if not 0 <= k < m:
        raise SystemExit(f"--shard {args.shard}: expected K/M with 0 <= K < M")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    plan_file = root / "plan.jsonl"  # written once: a later machine's topics may differ, its resume must not
    jobs = _read(plan_file)
    if jobs and len(jobs) != args.n:
        print(f"{plan_file}: the run's plan holds {len(jobs)} jobs; --n {args.n} ignored", file=sys.stderr)
    if not jobs:
        jobs = plan(tok, args.n, args.seed)
        tmp = plan_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(j) + "\n" for j in jobs), encoding="utf-8")
        tmp.replace(plan_file)
    run(
        model,
        tok,
        root / f"shard{k}" if m > 1 else root,
        jobs,
        shard=(k, m),
        seed=args.seed,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        followup_every=args.followup_every,
        chunk=args.chunk,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
