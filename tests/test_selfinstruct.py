"""Self-instruct data: the plan, message cleaning, packing with the held-out sets kept disjoint."""

import json

from mlx_specstream import selfinstruct as si
from mlx_specstream.bench.heldout import EVERYDAY, HELDOUT_SETS, held_out_texts, heldout_prompts
from mlx_specstream.distill import instructions
from mlx_specstream.stdlib_data import split_files


def test_held_out_sets_exist_and_share_no_8gram_with_the_training_generators():
    assert len(heldout_prompts("humaneval", 1000)) == 164
    assert len(EVERYDAY) >= 30 and len(set(EVERYDAY)) == len(EVERYDAY)
    edits = heldout_prompts("code-edit", 20)
    assert len(edits) == 20 and all(
        "```python\ndef " in e or "```python\nfrom" in e or "```python\nimport" in e for e in edits
    )
    generators = [*si.SHOTS, *si.EDITS, si.FOLLOWUP_SHOT, *instructions(split_files()[0], 300)]
    train_grams = set().union(*(si.ngrams(t) for t in generators))
    for name in HELDOUT_SETS:
        for p in heldout_prompts(name, 200):
            assert not si.ngrams(p) & train_grams, (name, p[:80])


def test_clean_message_keeps_one_usable_paragraph():
    assert si.clean_message(" How do I boil an egg?\n\nTopic: x") == "How do I boil an egg?"
    assert si.clean_message("ok") is None
    assert si.clean_message("Kind: advice\nMessage: hi there friend") is None


def test_pack_drops_records_that_overlap_a_held_out_set(tmp_path):
    out = tmp_path / "run"
    (out / "shard1").mkdir(parents=True)
    overlap = EVERYDAY[0]  # a held-out question, verbatim inside a training message
    recs = [
        {
            "id": 0,
            "split": "train",
            "messages": [{"role": "user", "content": "Tell me about otters."}],
            "prompt_ids": [1, 2],
            "completion_ids": [3, 4],
        },
        {
            "id": 1,
            "split": "valid",
            "messages": [{"role": "user", "content": "What do owls eat at night?"}],
            "prompt_ids": [1],
            "completion_ids": [5],
        },
        {
            "id": 2,
            "split": "train",
            "messages": [{"role": "user", "content": f"Please answer: {overlap}"}],
            "prompt_ids": [1],
            "completion_ids": [6],
        },
        {"id": 3, "split": "train", "messages": None, "prompt_ids": [], "completion_ids": []},  # a failed follow-up
    ]
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    (out / "shard1" / "followups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[2:]) + '{"cut')
    counts = si.pack(out, tmp_path / "data", held_out_texts())
    assert counts == {"train": 1, "valid": 1, "dropped": 1}
    train = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert train == [{"prompt_ids": [1, 2], "completion_ids": [3, 4]}]


def test_the_plan_splits_by_topic():
    class Tok:
        vocab = {"Ġwalrus": 5, "Ġharbour": 6, "Ġlanterns": 7, "Ġx": 8}

    a = si.plan(Tok(), 200, 0)  # written once to plan.jsonl by a run: resumes never re-plan
    for j in a:
        key = j["topic"] if j["kind"] != "code edit" else j["message"].split("```python\n")[1][:-4]
        assert j["split"] == ("valid" if si._valid(key) else "train")
    assert {j["kind"] for j in a} - {"code edit"} <= set(si.KINDS)
