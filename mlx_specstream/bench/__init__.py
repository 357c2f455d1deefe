"""``specstream bench``: on-device benchmark harness.

    specstream bench [--model M] [--quick] [--json out.json] [--csv out.csv] [--plots DIR]
    specstream bench compare A.json B.json
    specstream bench show RESULT.json [--markdown]
    specstream bench tune [--model M] [--write] [--temp T]

One process, one run, same weights and prompts for every method (:mod:`.runners`); prompt sets
(:mod:`.prompts`); table, CSV, plots, comparison (:mod:`.report`); device tuning (:mod:`.tune`).
Stored results live under ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import default_model_path
from ..cli import check_args
from ..drafters import DEFAULT_NUM_DRAFT
from .report import compare, markdown, plots, table, write_csv
from .runners import run_bench
from .tune import CANDIDATES, tune
from ..errors import UserError
from ..tree import MAX_LOOKUP


def setup_arg_parser(parser=None):
    p = parser or argparse.ArgumentParser(description="On-device benchmark harness")
    p.add_argument("--model", default=None)
    p.add_argument(
        "--prompts",
        action="append",
        default=None,
        help="heldout | sitepackages | chat | code | random:LEN | file.jsonl; repeat to run several sets "
        "in one interleaved run (reported together and per set; --n-prompts from each)",
    )
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("-m", "--max-tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--tree",
        action="append",
        default=None,
        help="SS tree(s) to run: a tree spec, `default` (the stream config's tree, its drafts alone) or `config` "
        "(the whole setting a user gets: tree and context drafts, the `sampled` one when sampling); "
        "default: `default`",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma list of rows to run: a whole name (ss[default]: that row only) or a family (ss, lookup, medusa, draft: all its rows)",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        help="draft model: two-model decoding in our loop and in mlx-lm's (default model: its draft)",
    )
    p.add_argument("--num-draft", type=int, default=DEFAULT_NUM_DRAFT)
    p.add_argument("--streams", default=None, help="stream adapter to bench (a name or .json; default: the model's)")
    p.add_argument("--medusa", default=None, help="folder with medusa_heads.json")
    p.add_argument(
        "--lookup",
        type=int,
        action="append",
        default=[],
        help="also run context drafts (prompt lookup) of this length, alone and with the streams",
    )
    p.add_argument(
        "--temp",
        type=float,
        action="append",
        default=[],
        help="also run sampled rows at this temperature (our AR, mlx-lm AR and the stream config's tree, "
        "alone and with its context drafts; --temp-methods to choose)",
    )
    p.add_argument(
        "--temp-methods", default=None, help="comma list of rows the sampled rows run (names or families, as --methods)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="cast every peer's weights (CPU: float32 is fastest)",
    )
    p.add_argument("--quick", action="store_true", help="small run (~1 minute on 2 CPU cores)")
    p.add_argument("--json", default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--plots", default=None, help="folder for PNG plots")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        if len(argv) != 3:
            raise UserError("usage: specstream bench compare A.json B.json")
        print(compare(json.loads(Path(argv[1]).read_text()), json.loads(Path(argv[2]).read_text())))
        return 0
    if argv and argv[0] == "show":  # a stored run again: its table, or the README's Markdown table
        ap = argparse.ArgumentParser(description="print a stored bench result")
        ap.add_argument("result")
        ap.add_argument("--markdown", action="store_true")
        a = ap.parse_args(argv[1:])
        res = json.loads(Path(a.result).read_text())
        print(markdown(res) if a.markdown else table(res))
        return 0
    if argv and argv[0] == "tune":
        ap = argparse.ArgumentParser(description="tune the tree to this device")
        ap.add_argument("--model", default=None)
        ap.add_argument("--prompts", default="heldout")
        ap.add_argument("--n-prompts", type=int, default=6)
        ap.add_argument("--write", action="store_true", help="write the tuned settings into the attached stream config")
        ap.add_argument(
            "--write-to",
            default=None,
            metavar="FILE.json",
            help="tune this stream config and write into it (needed for the package's own adapters)",
        )
        ap.add_argument(
            "--streams",
            default=None,
            help="the adapter to tune (a name or .json; default: --write-to's, else the model's)",
        )
        ap.add_argument("--quick", action="store_true")
        ap.add_argument(
            "--temp",
            type=float,
            default=0.0,
            help="tune sampled decoding at this temperature; written as the config's `sampled` "
            "setting, used whenever generation samples (default 0: greedy)",
        )
        ap.add_argument(
            "--candidates",
            default=",".join(CANDIDATES),
            help=f"comma list of the settings measured beside plain decoding: {', '.join(CANDIDATES)} "
            "(fixed: the cost model's tree, two chains and none, with context drafts and τ; auto, "
            "auto:context: trees sized every step); default: all",
        )
        ap.add_argument("--json", default=None)
        a = ap.parse_args(argv[1:])
        check_args(a)
        res = tune(
            a.model,
            prompts=a.prompts,
            n_prompts=a.n_prompts,
            write=a.write,
            quick=a.quick,
            write_to=a.write_to,
            streams=a.streams,
            temp=a.temp,
            candidates=[c.strip() for c in a.candidates.split(",") if c.strip()],
        )
        print(json.dumps({k: v for k, v in res.items() if k != "fingerprint"}, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        return 0
    args = setup_arg_parser().parse_args(argv)
    check_args(args)
    bad = next((k for k in args.lookup if not 0 <= k <= MAX_LOOKUP), None)
    if bad is not None:
        raise UserError(f"--lookup must be in 0..{MAX_LOOKUP}, got {bad}")
    if args.quick:
        args.n_prompts, args.max_tokens, args.trials, args.warmup = (
            min(args.n_prompts, 3),
            min(args.max_tokens, 48),
            1,
            1,
        )
    draft = args.draft_model
    if draft is None and args.model is None:  # the embedded model comes with its draft model
        draft = str(default_model_path("draft"))
    res = run_bench(
        args.model,
        methods=args.methods.split(",") if args.methods else None,
        trees=args.tree or ["default"],
        prompts=args.prompts or ["heldout"],
        n_prompts=args.n_prompts,
        max_tokens=args.max_tokens,
        trials=args.trials,
        warmup=args.warmup,
        draft=draft,
        num_draft=args.num_draft,
        medusa=args.medusa,
        seed=args.seed,
        dtype=args.dtype,
        lookups=args.lookup,
        streams_name=args.streams,
        temps=args.temp,
        **({"temp_methods": args.temp_methods.split(",")} if args.temp_methods else {}),
    )
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.csv:
        write_csv(res, Path(args.csv))
    if args.plots:
        for f in plots(res, Path(args.plots)):
            print(f"wrote {f}")
    return 0
