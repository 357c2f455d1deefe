import json
import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_map

from mlx_specstream.bench.report import compare, plots, table, write_csv
from mlx_specstream.bench.runners import METHOD_FIELDS, divergence, run_bench
from mlx_specstream.bench.tune import beats, choose_tree, expected_tokens, tune
from mlx_specstream.drafters import MedusaConfig, MedusaHeads, save_medusa
from mlx_specstream.streams import SpeculativeStreams, StreamConfig, save_streams
from mlx_specstream.checkpoint import load_model


@pytest.fixture(scope="module")
def bench_result(hf_model, tmp_path_factory):
    src, _ = hf_model("llama")
    d = tmp_path_factory.mktemp("bench") / "m"
    shutil.copytree(src, d)
    base, _ = load_model(d)
    mx.random.seed(0)
    s = SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2), base)
    s.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, s.parameters()))
    save_streams(d, s)
    heads = MedusaHeads(MedusaConfig(num_heads=2), base)
    heads.init_from_lm_head(base)
    save_medusa(d / "medusa", heads)
    draft = hf_model("llama_linear_rope")[0]  # any model with the same vocabulary
    res = run_bench(
        str(d),
        trees=["default", "chain"],
        prompts="random:12",
        n_prompts=2,
        max_tokens=16,
        trials=2,
        warmup=1,
        draft=str(draft),
        medusa=str(d / "medusa"),
        progress=False,
        lookups=[3],
    )
    return res, d


def test_every_method_and_metric_present(bench_result):
    res, _ = bench_result
    assert set(res["methods"]) == {
        "ours_ar",
        "mlx_lm_ar",
        "ss[default]",
        "ss[chain]",
        "medusa",
        "medusa[chain]",
        "mlx_lm_draft[3]",
        "draft[3]",
        "ss[default]+lookup[3]",
        "ss[chain]+lookup[3]",
        "lookup[3]",
    }
    for name, m in res["methods"].items():
        for f in METHOD_FIELDS:
            assert f in m, (name, f)
        assert m["decode_tps"]["min"] <= m["decode_tps"]["median"] <= m["decode_tps"]["max"]
        assert set(m["step_latency_ms"]) == set(m["inter_token_latency_ms"]) == {"p50", "p90", "p99"}
        # a step's tokens reach the caller together: the inter-token median is 0 once steps carry >1 token
        assert m["step_latency_ms"]["p50"] >= m["inter_token_latency_ms"]["p50"]
    fp = res["fingerprint"]
    for k in ("backend", "device", "memory_gb", "os", "python", "mlx", "mlx_lm", "blas"):
        assert k in fp
    # greedy peers produce our AR's tokens
    for name in res["methods"]:
        assert res["methods"][name]["equal_to_ar"], name
    assert res["methods"]["ss[default]"]["extra_params"] > 0
    # a row's peak memory counts the weights it uses, not every peer's loaded beside it
    ms = res["methods"]
    assert ms["ours_ar"]["peak_memory_gb"] < ms["ours_ar"]["peak_process_gb"]
    assert (
        ms["medusa"]["peak_memory_gb"] - ms["ours_ar"]["peak_memory_gb"] > 0.5 * ms["medusa"]["extra_params"] * 2 / 1e9
    )
    assert res["methods"]["ours_ar"]["mean_accepted"] == 1.0
    json.dumps(res)  # serialisable


def test_outputs(bench_result, tmp_path):
    res, _ = bench_result
    t = table(res)
    assert "ss[default]" in t and "mlx_lm_ar" in t
    write_csv(res, tmp_path / "r.csv")
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + len(res["methods"])
    files = plots(res, tmp_path / "plots")
    assert all(f.exists() and f.stat().st_size > 1000 for f in files) and len(files) == 3


def test_divergence():
    d = divergence([[1, 2, 3], [1, 2, 3], [1, 2]], [[1, 2, 3], [1, 9, 3], [1, 2, 5]])
    assert d == {"equal_to_ar": False, "divergence_rate": 2 / 3, "first_divergence": [None, 1, 2]}
    assert divergence([[4]], [[4]])["equal_to_ar"]


def test_compare_reports_planted_difference(bench_result):
    res, _ = bench_result
    other = json.loads(json.dumps(res))
    other["methods"]["ss[default]"]["decode_tps"]["median"] *= 2
    other["fingerprint"]["device"] = "Apple M9"
    out = compare(res, other)
    assert "device" in out and "Apple M9" in out
    line = [l for l in out.splitlines() if l.startswith("ss[default]")][0]
    assert line.split()[3] == "2.00"


def test_tuner_picks_known_best_tree():
    # Stream 1's top-1 is almost always right, rank 1 rarely; stream 2 is useless.
    acc = [[0.9, 0.05, 0.01], [0.02, 0.01, 0.0]]
    flat = {1: 10.0, 2: 10.0, 4: 10.0, 8: 10.0}  # verification is free up to 8 nodes
    paths, _ = choose_tree(flat, acc, 2, max_nodes=8)
    assert paths[0] == (0,) and len(paths) == 7  # with free compute take every helpful node
    steep = {1: 10.0, 2: 11.0, 4: 40.0, 8: 80.0}  # more than 2 nodes is expensive
    paths, _ = choose_tree(steep, acc, 2, max_nodes=8)
    assert paths == ((0,),)
    assert expected_tokens(((0,), (0, 0)), acc) == pytest.approx(1 + 0.9 + 0.9 * 0.02)


def test_a_setting_beats_plain_decoding_when_faster_in_every_paired_round():
    assert beats([20.0, 25.0, 22.0], [19.0, 24.0, 21.5])  # drift: slowest 20 < plain's fastest 24
    assert not beats([20.0, 25.0, 22.0], [19.0, 24.0, 22.5])  # one round slower
    assert not beats([30.0, 30.0], [19.0, 24.0, 20.0]) and not beats([], [])


def test_tune_writes_a_measured_choice(bench_result, tmp_path):
    from mlx_specstream import load
    from mlx_specstream.generate import stream_generate

    _, d = bench_result
    m = tmp_path / "m"
    shutil.copytree(d, m)
    res = tune(str(m), prompts="random:12", n_prompts=3, write=True, quick=True)
    # plain + (tree, lookup, τ) tried + the two trees sized every step
    assert len(res["measured_tps"]) in (1 + 2 * 4 * 2 + 3 + 2, 1 + 3 * 4 * 2 + 3 + 2)
    assert {"tree=auto lookup=8 tau=0.0", "tree=auto:context lookup=8 tau=0.0"} <= set(res["measured_tps"])
    cfg = json.loads((m / "speculative_streams.json").read_text())
    assert cfg["lookup"] == res["lookup"] in (0, 3, 5, 8) and cfg["prune_threshold"] == res["prune_threshold"]
    assert cfg["tree"] == res["tree"] and cfg["tuned_on"] == res["tuned_on"]
    plain = res["measured_tps"]["tree=[] lookup=0 tau=0.0"]
    chosen = res["measured_tps"][f"tree={res['tree']} lookup={res['lookup']} tau={res['prune_threshold']}"]
    best = max(v["median"] for v in res["measured_tps"].values())
    if res["beats_plain_beyond_noise"]:  # the fastest, and faster than plain decoding in every round
        assert chosen["median"] == best and beats(chosen["rounds"], plain["rounds"])
    else:  # nothing beat plain decoding beyond the noise: plain decoding is written
        assert res["plain_decoding"] and cfg["tree"] == [] and cfg["lookup"] == 0
    model, tok = load(str(m))
    spec = [t for r in stream_generate(model, tok, "a b c a b c", max_tokens=24) for t in r.tokens]
    ar = [t for r in stream_generate(model, tok, "a b c a b c", max_tokens=24, speculative=False) for t in r.tokens]
    assert spec == ar


def test_tune_for_sampling_writes_the_sampled_setting_and_keeps_greedys(bench_result, tmp_path):
    """`bench tune --temp T` measures sampled decoding and writes it as the config's `sampled`
    setting; the greedy setting is left as it was, and loading picks the sampled one up."""
    from mlx_specstream import load

    _, d = bench_result
    m = tmp_path / "m"
    shutil.copytree(d, m)
    before = json.loads((m / "speculative_streams.json").read_text())
    res = tune(str(m), prompts="random:12", n_prompts=2, write=True, quick=True, temp=0.7)
    cfg = json.loads((m / "speculative_streams.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "sampled"} == {k: v for k, v in before.items() if k != "sampled"}
    s = cfg["sampled"]
    assert (
        s
        == {
            "temp": 0.7,
            "tree": res["tree"],
            "lookup": res["lookup"],
            "prune_threshold": res["prune_threshold"],
            "tuned_on": res["tuned_on"],
        }
        and res["temp"] == 0.7
    )
    plain = res["measured_tps"]["tree=[] lookup=0 tau=0.0"]
    chosen = res["measured_tps"][f"tree={res['tree']} lookup={res['lookup']} tau={res['prune_threshold']}"]
    if res["beats_plain_beyond_noise"]:
        assert beats(chosen["rounds"], plain["rounds"])
    else:
        assert s["tree"] == [] and s["lookup"] == 0
    model, _ = load(str(m))
    assert model.drafter.sampled.to_json() == s and model.drafter.sampled.temp == 0.7
    with pytest.raises(ValueError, match="temp must be >= 0"):
        tune(str(m), temp=-1.0)


def test_tune_measures_only_the_candidate_families_named(bench_result, tmp_path):
    """`bench tune --candidates auto:context` measures that setting and plain decoding, nothing
    else (a shorter run); an unknown family is refused by name before anything is measured."""
    _, d = bench_result
    res = tune(str(d), prompts="random:12", n_prompts=2, quick=True, temp=0.7, candidates=["auto:context"])
    assert set(res["measured_tps"]) == {"tree=[] lookup=0 tau=0.0", "tree=auto:context lookup=8 tau=0.0"}
    assert res["tree"] in ([], "auto:context") and res["cost_ms"] == {}
    with pytest.raises(ValueError, match="tune candidates must be among fixed, auto, auto:context, got chains"):
        tune(str(d), quick=True, candidates=["chains"])


def test_bench_config_row_is_the_setting_a_user_gets(bench_result, tmp_path):
    """`--tree config`: the adapter's whole setting — greedy rows its tree and context drafts,
    sampled rows its `sampled` setting (here one stream draft per step, no context drafts)."""
    _, d = bench_result
    m = tmp_path / "m"
    shutil.copytree(d, m)
    cfg = json.loads((m / "speculative_streams.json").read_text())
    cfg.update(tree=[[0], [1], [0, 0]], lookup=2, sampled={"temp": 1.5, "tree": [[0]], "lookup": 0})
    (m / "speculative_streams.json").write_text(json.dumps(cfg))
    res = run_bench(
        str(m),
        trees=["config"],
        prompts="random:12",
        n_prompts=2,
        max_tokens=12,
        trials=1,
        warmup=0,
        temps=[1.5],
        temp_methods=["ss[config]"],
        progress=False,
        lookups=[],
    )
    ms = res["methods"]
    assert set(ms) == {"ours_ar", "mlx_lm_ar", "ss[config]", "ss[config]@1.5", "lookup[2]"}
    assert ms["ss[config]"]["equal_to_ar"] and 4 <= ms["ss[config]"]["tree_size"] <= 4 + 2
    assert ms["ss[config]@1.5"]["tree_size"] == 2


def test_the_stream_configs_own_context_drafts_run_with_its_tree_and_alone(bench_result, tmp_path):
    _, d = bench_result
    m = tmp_path / "m"
    shutil.copytree(d, m)
    cfg = json.loads((m / "speculative_streams.json").read_text())
    (m / "speculative_streams.json").write_text(json.dumps({**cfg, "lookup": 2}))
    res = run_bench(
        str(m),
        trees=["default", "chain"],
        prompts="random:12",
        n_prompts=1,
        max_tokens=8,
        trials=1,
        warmup=0,
        progress=False,
    )
    assert set(res["methods"]) == {
        "ours_ar",
        "mlx_lm_ar",
        "ss[default]",
        "ss[default]+lookup[2]",
        "ss[chain]",
        "lookup[2]",
    }


def test_tune_measures_the_adapter_it_writes(bench_result, tmp_path):
    """--write-to FILE tunes FILE's adapter (a fresh one beside the attached), not the attached one."""
    _, d = bench_result
    m = tmp_path / "m"
    shutil.copytree(d, m)
    base, _ = load_model(m)
    save_streams(m, SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1), base), name="other")
    attached = (m / "speculative_streams.json").read_text()
    other = m / "speculative_streams-other.json"
    res = tune(str(m), prompts="random:12", n_prompts=2, quick=True, write_to=str(other))
    assert res["adapter"] == str(other) and len(res["rank_acceptance"]) == 2  # the 2-stream adapter was measured
    assert json.loads(other.read_text())["tuned_on"] == res["tuned_on"]
    assert (m / "speculative_streams.json").read_text() == attached
    with pytest.raises(ValueError, match="name different files"):
        tune(str(m), streams=str(m / "speculative_streams.json"), write_to=str(other))


def test_bench_shared_adapter_against_its_fused_model(bench_result, tmp_path):
    """A shared-mode adapter changes the model: both AR baselines decode the base with the LoRA
    fused in, and every method's greedy output equals that."""
    _, d = bench_result
    m = tmp_path / "m"
    shutil.copytree(d, m)
    base, _ = load_model(m)
    mx.random.seed(3)
    s = SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=2, mode="shared", lora_rank=4), base)
    s.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, s.parameters()))
    save_streams(m, s, name="shared")
    res = run_bench(
        str(m),
        trees=["chain"],
        prompts="random:12",
        n_prompts=2,
        max_tokens=16,
        trials=1,
        warmup=0,
        progress=False,
        lookups=[2],
        streams_name="shared",
    )
    assert set(res["methods"]) == {"ours_ar", "mlx_lm_ar", "ss[chain]", "ss[chain]+lookup[2]", "lookup[2]"}
    for name, r in res["methods"].items():
        assert r["equal_to_ar"], name
    assert res["config"]["stream_config"]["mode"] == "shared"


def test_several_prompt_sets_and_sampled_rows_in_one_run(bench_result, tmp_path, capsys):
    """Two prompt sets interleave in one run, reported together and per set; --temp adds sampled
    rows compared with the AR baselines at the same temperature."""
    from mlx_specstream.bench import main

    _, d = bench_result
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "--model",
                str(d),
                "--prompts",
                "random:12",
                "--prompts",
                "random:7",
                "--n-prompts",
                "2",
                "-m",
                "12",
                "--trials",
                "2",
                "--warmup",
                "0",
                "--tree",
                "chain",
                "--lookup",
                "2",
                "--temp",
                "1.5",
                "--json",
                str(out),
                "--csv",
                str(tmp_path / "r.csv"),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    ms = res["methods"]
    assert set(ms) == {
        "ours_ar",
        "mlx_lm_ar",
        "ss[chain]",
        "ss[chain]+lookup[2]",
        "lookup[2]",
        "ours_ar@1.5",
        "mlx_lm_ar@1.5",
    }  # the sampled rows: AR baselines and the default tree
    assert res["config"]["n_prompts_by_set"] == {"random:12": 2, "random:7": 2}
    for name, m in ms.items():
        assert set(m["by_set"]) == {"random:12", "random:7"}
        assert sum(b["generated_tokens"] for b in m["by_set"].values()) == m["generated_tokens"]
        if "@" in name:
            assert m["temperature"] == 1.5 and m["equal_to_ar"] is None
            assert set(m["speedup"]) == {"ours_ar", "mlx_lm_ar"}
        else:
            assert m["equal_to_ar"] and all(b["equal_to_ar"] for b in m["by_set"].values()), name
    # the sampled baseline is compared with itself at its temperature, and really samples
    assert ms["ours_ar@1.5"]["speedup"]["ours_ar"] == 1.0
    assert ms["ours_ar@1.5"]["left_greedy_path"] > 0
    text = capsys.readouterr().out
    assert "prompt set random:7 (2 prompts)" in text and "ours_ar@1.5" in text
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 * 3  # header, then every row for all prompts and per set
    # the stored run prints again, as the README's Markdown table: one line per row, per-set figures
    assert main(["show", str(out), "--markdown"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0].startswith("| method |") and "(random:12 / random:7)" in md[0] and len(md) == 2 + 7
    line = next(l for l in md if l.startswith("| ss[chain]+lookup[2] |")).split(" | ")
    acc = ms["ss[chain]+lookup[2]"]
    assert (
        line[2] == f"{acc['mean_accepted']:.2f} ({acc['by_set']['random:12']['mean_accepted']:.2f} / "
        f"{acc['by_set']['random:7']['mean_accepted']:.2f})"
    )
    assert main(["show", str(out)]) == 0 and "prompt set random:7" in capsys.readouterr().out


def test_sampled_rows_include_the_stream_configs_tree(bench_result):
    _, d = bench_result
    res = run_bench(
        str(d),
        trees=["default"],
        prompts="random:12",
        n_prompts=1,
        max_tokens=8,
        trials=1,
        warmup=0,
        progress=False,
        temps=[0.7],
        methods=["ours_ar", "ss"],
    )
    assert set(res["methods"]) == {"ours_ar", "ss[default]", "ours_ar@0.7", "ss[default]@0.7"}
    assert res["methods"]["ss[default]@0.7"]["speedup"] == {
        "ours_ar": pytest.approx(
            res["methods"]["ss[default]@0.7"]["decode_tps_by_trial"][0]
            / res["methods"]["ours_ar@0.7"]["decode_tps_by_trial"][0]
        )
    }
    with pytest.raises(ValueError, match="temperatures"):
        run_bench(str(d), prompts="random:12", n_prompts=1, temps=[0.0], progress=False)


def test_chat_and_code_prompt_sets_use_the_chat_template():
    from mlx_specstream.bench.prompts import load_prompts
    from mlx_specstream.stdlib_data import split_files, stdlib_root

    class Tok:  # what the template renderer reads; encode sees the rendered text only
        has_chat_template = True
        special_tokens_map = {}

        def get_chat_template(self, chat_template=None, tools=None):
            return (
                "{{ messages[0]['role'] }}|{% if add_generation_prompt %}G|{% endif %}{{ messages[0]['content'][:5] }}"
            )

        def encode(self, t, add_special_tokens=True):
            assert not add_special_tokens and t.startswith("user|G|"), "chat sets go through the template"
            return [7] + [ord(c) % 100 for c in t[len("user|G|") :]]

    for spec in ("chat", "code", "everyday", "code-edit"):
        ids = load_prompts(spec, 8, Tok(), 100)
        assert len(ids) == 8 and all(p[0] == 7 for p in ids)
    from mlx_specstream.bench.prompts import builtin_prompts

    assert builtin_prompts("humaneval", 3)[0].startswith("from typing import List")  # raw completions

    held = {p.relative_to(stdlib_root()).parts[0].removesuffix(".py") for p in split_files()[1]}
    named = [t.split("`")[1].split(".")[0] for t in builtin_prompts("chat", 40) if t.startswith("Explain")]
    assert named and set(named) <= held  # questions about held-out modules only


def test_prompt_files_take_texts_or_chat_messages(tmp_path):
    from mlx_specstream.bench.prompts import load_prompts

    class Tok:
        has_chat_template = True
        special_tokens_map = {}

        def get_chat_template(self, chat_template=None, tools=None):
            return "T{{ messages | length }}"

        def encode(self, t, add_special_tokens=True):
            return [7, int(t[1:])] if t.startswith("T") else [1, len(t)]

    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"prompt": "abc"}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n"
    )
    assert load_prompts(str(f), 5, Tok(), 100) == [[1, 3], [7, 1]]
    f.write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(ValueError, match="p.jsonl:1: records need a 'prompt' string or a 'messages' list"):
        load_prompts(str(f), 5, Tok(), 100)


def test_methods_are_selected_by_whole_name_or_family_never_by_prefix():
    from mlx_specstream.bench.runners import Method, select

    rows = [Method(n, None) for n in ("ours_ar", "mlx_lm_ar", "ss[default]", "ss[default]+lookup[5]", "lookup[5]")]
    names = lambda sel: [m.name for m in sel]  # noqa: E731
    assert names(select(rows, ["ss[default]"])) == ["ss[default]"]  # not its +lookup row
    assert names(select(rows, ["ss", "ours_ar"])) == ["ours_ar", "ss[default]", "ss[default]+lookup[5]"]
    with pytest.raises(ValueError, match=r"no bench row \['ss\[chain\]'\]"):
        select(rows, ["ss[chain]"])
    assert names(select(rows, ["ss[chain]", "lookup"], None)) == ["lookup[5]"]  # the default list: absent rows skipped
