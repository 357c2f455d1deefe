"""Time and peak memory of converting a ~1B-parameter checkpoint (random weights, TinyLlama's
shape, built with transformers from a config: no download).

    python benchmarks/convert_1b.py [--work /tmp/conv1b] [--bin]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/conv1b")
    ap.add_argument("--bin", action="store_true", help="save the source as PyTorch .bin shards instead")
    args = ap.parse_args()
    work = Path(args.work)
    src = work / "src"
    if not (src / "config.json").exists():
        import torch
        import transformers

        cfg = transformers.LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            tie_word_embeddings=False,
            torch_dtype="bfloat16",
        )
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        if args.bin:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from hf_models import save_bin

            save_bin(model, src, shards=4)
        else:
            model.save_pretrained(src, max_shard_size="1GB")
        (work / "params.txt").write_text(str(n))
        del model
    results = {"params": int((work / "params.txt").read_text())}
    for name, extra in (("float16", ["--dtype", "float16"]), ("q4", ["-q", "--q-bits", "4"])):
        dst = work / name
        shutil.rmtree(dst, ignore_errors=True)
        tic = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                (
                    "import resource, sys; from mlx_specstream.convert import main; main(sys.argv[1:]); "
                    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
                ),
                "--torch-path",
                str(src),
                "--mlx-path",
                str(dst),
                *extra,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        secs = time.perf_counter() - tic
        rss = int(next(l for l in out.stdout.splitlines() if l.startswith("MAXRSS_KB")).split()[1])
        results[name] = {
            "seconds": round(secs, 1),
            "peak_rss_gb": round(rss / 1e6, 2),
            "mlx_peak": next((l for l in out.stderr.splitlines() if "peak memory" in l), ""),
        }
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
