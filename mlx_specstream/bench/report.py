"""Bench output: the table, CSV, PNG plots, and the comparison of two stored runs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_equal(v) -> str:
    return "-" if v is None else str(v)


def _rows(methods: dict) -> List[str]:
    hdr = f"{'method':<24}{'decode tok/s':>18}{'TTFT ms':>9}{'step p50':>9}{'ITL p99':>8}{'acc/step':>9}{'vs AR':>7}{'vs mlx-lm':>10}{'equal':>7}{'extra params':>13}{'peak GB':>8}"
    lines = [hdr, "-" * len(hdr)]
    for name, m in methods.items():
        d = m["decode_tps"]
        step, itl = m["step_latency_ms"] or {}, m["inter_token_latency_ms"] or {}
        lines.append(
            f"{name:<24}{d['median']:>8.1f} ({d['min']:.0f}-{d['max']:.0f}){m['ttft_s']['median'] * 1e3:>9.1f}"
            f"{step.get('p50', 0):>9.2f}{itl.get('p99', 0):>8.2f}{m['mean_accepted']:>9.2f}"
            f"{_ratio(m['speedup'].get('ours_ar')):>7}{_ratio(m['speedup'].get('mlx_lm_ar')):>10}"
            f"{_fmt_equal(m.get('equal_to_ar')):>7}{m['extra_params']:>13}{m['peak_memory_gb']:>8.3f}"
        )
        if m["acceptance_by_depth"]:
            lines.append(f"{'':<24}levels reached: " + " ".join(f"{a:.2f}" for a in m["acceptance_by_depth"]))
        worst = (m.get("worst_prompt") or {}).get("mlx_lm_ar")
        if worst and name != "mlx_lm_ar":
            lines.append(f"{'':<24}worst prompt: {worst['speedup']:.2f}x mlx-lm (prompt {worst['prompt']})")
        if m.get("tree_sizes") and len(m["tree_sizes"]) > 1:
            total = sum(m["tree_sizes"].values())
            lines.append(
                f"{'':<24}tree sizes: "
                + " ".join(
                    f"{t}:{c / total:.0%}" for t, c in sorted(m["tree_sizes"].items(), key=lambda kv: int(kv[0]))
                )
                + f" (plain steps {m['plain_step_share']:.0%})"
            )
    return lines


def table(result: dict) -> str:
    """The run as text: every row over all prompts, then per prompt set when there are several.
    Sampled rows (``name@T``) compare with the AR baselines at the same temperature."""
    fp = result["fingerprint"]
    cfg = result.get("config", {})
    lines = [
        f"{fp['backend']} | {fp['device']} | mlx {fp['mlx']} | mlx-lm {fp['mlx_lm']}"
        + (f" | BLAS {fp['blas']}" if fp.get("blas") else "")
    ]
    sets = cfg.get("n_prompts_by_set") or {}
    if len(sets) > 1:
        lines.append("all prompts (" + ", ".join(f"{k}: {v}" for k, v in sets.items()) + ")")
    lines += _rows(result["methods"])
    for spec in sets if len(sets) > 1 else ():
        lines += ["", f"prompt set {spec} ({sets[spec]} prompts)"]
        lines += _rows({name: m["by_set"][spec] for name, m in result["methods"].items()})
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The run as a Markdown table (the README's): with several prompt sets, tokens per step and
    the speedup vs mlx-lm read ``all (set1 / set2 ...)``."""
    sets = list((result.get("config") or {}).get("n_prompts_by_set") or {})
    sets = sets if len(sets) > 1 else []

    def per_set(m, get, fmt):
        v = fmt(get(m))
        return v + (" (" + " / ".join(fmt(get(m["by_set"][s])) for s in sets) + ")" if sets else "")

    where = f" ({' / '.join(sets)})" if sets else ""
    lines = [
        f"| method | decode tok/s | tokens/step{where} | vs our AR | vs mlx-lm AR{where} "
        "| equal to AR | peak memory GB | extra params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        d = m["decode_tps"]
        lines.append(
            f"| {name} | {d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) "
            f"| {per_set(m, lambda x: x['mean_accepted'], lambda v: f'{v:.2f}')} "
            f"| {_ratio(m['speedup'].get('ours_ar'))} "
            f"| {per_set(m, lambda x: x['speedup'].get('mlx_lm_ar'), _ratio)} "
            f"| {_fmt_equal(m.get('equal_to_ar'))} | {m['peak_memory_gb']:.3f} | {m['extra_params']:,} |"
        )
    return "\n".join(lines)


CSV_FIELDS = [
    "set",
    "method",
    "temperature",
    "decode_tps_median",
    "decode_tps_min",
    "decode_tps_max",
    "ttft_s",
    "prompt_tps",
    "step_p50_ms",
    "step_p99_ms",
    "itl_p50_ms",
    "itl_p90_ms",
    "itl_p99_ms",
    "mean_accepted",
    "acceptance_by_depth",
    "speedup_vs_ours_ar",
    "speedup_vs_mlx_lm_ar",
    "peak_memory_gb",
    "peak_process_gb",
    "extra_params",
    "equal_to_ar",
    "divergence_rate",
]


def write_csv(result: dict, path: Path) -> None:
    """One line per row and prompt set (``all`` = every prompt)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for name, top in result["methods"].items():
            for spec, m in [("all", top)] + list(top.get("by_set", {}).items()):
                step, itl = m["step_latency_ms"] or {}, m["inter_token_latency_ms"] or {}
                w.writerow(
                    [
                        spec,
                        name,
                        m.get("temperature", 0.0),
                        m["decode_tps"]["median"],
                        m["decode_tps"]["min"],
                        m["decode_tps"]["max"],
                        m["ttft_s"]["median"],
                        m["prompt_tps"]["median"],
                        step.get("p50"),
                        step.get("p99"),
                        itl.get("p50"),
                        itl.get("p90"),
                        itl.get("p99"),
                        m["mean_accepted"],
                        " ".join(f"{a:.3f}" for a in m["acceptance_by_depth"]),
                        m["speedup"].get("ours_ar"),
                        m["speedup"].get("mlx_lm_ar"),
                        m["peak_memory_gb"],
                        m.get("peak_process_gb"),
                        m["extra_params"],
                        m.get("equal_to_ar"),
                        m.get("divergence_rate"),
                    ]
                )


def plots(result: dict, out: Path) -> List[Path]:
    import matplotlib  # optional: the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ms = result["methods"]
    names = list(ms)
    files = []

    def save(fig, name):
        fig.tight_layout()
        files.append(out / name)
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [ms[n]["speedup"].get("mlx_lm_ar", 0) for n in names], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("decode speedup vs mlx-lm AR")
    ax.set_title(result["fingerprint"]["device"])
    ax.tick_params(axis="x", labelrotation=20)
    save(fig, "speedup.png")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [(ms[n]["step_latency_ms"] or {}).get("p50", 0) for n in names], label="step p50")
    ax.scatter(
        names,
        [(ms[n]["inter_token_latency_ms"] or {}).get("p99", 0) for n in names],
        color="tab:red",
        label="inter-token p99",
        zorder=3,
    )
    ax.set_ylabel("latency (ms)")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=20)
    save(fig, "latency.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        acc = ms[n]["acceptance_by_depth"]
        if acc:
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=n)
    ax.set_xlabel("tree level")
    ax.set_ylabel("share of steps reaching it")
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend()
    save(fig, "acceptance.png")
    return files


def compare(a: dict, b: dict) -> str:
    lines = []
    for k in ("backend", "device", "mlx", "mlx_lm", "blas"):
        if a["fingerprint"].get(k) != b["fingerprint"].get(k):
            lines.append(f"fingerprint {k}: {a['fingerprint'].get(k)} -> {b['fingerprint'].get(k)}")
    lines.append(f"{'method':<22}{'A tok/s':>10}{'B tok/s':>10}{'B/A':>7}{'A acc':>7}{'B acc':>7}")
    for name in sorted(set(a["methods"]) | set(b["methods"])):
        ma, mb = a["methods"].get(name), b["methods"].get(name)
        if ma is None or mb is None:
            lines.append(f"{name:<22}{'only in ' + ('B' if ma is None else 'A'):>20}")
            continue
        ta, tb = ma["decode_tps"]["median"], mb["decode_tps"]["median"]
        lines.append(
            f"{name:<22}{ta:>10.1f}{tb:>10.1f}{tb / ta:>7.2f}{ma['mean_accepted']:>7.2f}{mb['mean_accepted']:>7.2f}"
        )
        if ma.get("equal_to_ar") != mb.get("equal_to_ar"):
            lines.append(f"{'':<22}equal_to_ar: {ma.get('equal_to_ar')} -> {mb.get('equal_to_ar')}")
    return "\n".join(lines)
