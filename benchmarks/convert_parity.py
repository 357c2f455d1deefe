"""Model parity with transformers (base logits, loading the HF folder directly) and converter
parity: for every test family and both modes, build a tiny random transformers model,
attach random stream parameters with the PyTorch reference, convert, and print the max |Δ| of the
main and stream logits between PyTorch and MLX (float32).

    python benchmarks/convert_parity.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main():
    import mlx.core as mx
    import numpy as np
    import torch

    from convert.pytorch_reference import SpeculativeStreamsTorch, forward_with_streams, save_streams_torch
    from hf_models import CONFIGS, make_hf_model
    from mlx_specstream.convert import convert
    from mlx_specstream.streams import forward_with_streams as mlx_forward_with_streams
    from mlx_specstream.streams import load_streams
    from mlx_specstream.checkpoint import load_model

    ids = torch.tensor([[1, 5, 9, 33, 200, 17, 40, 8, 77]])
    print(f"{'family config':24}{'max|Δ| base logits vs transformers':>36}")
    for name in sorted(CONFIGS):
        d = Path(tempfile.mkdtemp())
        hf = make_hf_model(name, d)
        with torch.no_grad():
            ref = hf(ids).logits.numpy()
        model, _ = load_model(d)
        print(f"{name:24}{np.abs(np.array(model(mx.array(ids.numpy()))) - ref).max():>36.1e}", flush=True)
        shutil.rmtree(d)
    print()
    print(f"{'family config':24}{'mode':10}{'max|Δ| main':>14}{'max|Δ| streams':>16}")
    for name in sorted(CONFIGS):
        for mode in ("lossless", "shared"):
            d = Path(tempfile.mkdtemp())
            hf = make_hf_model(name, d / "src")
            torch.manual_seed(0)
            s = SpeculativeStreamsTorch(
                {
                    "num_streams": 3,
                    "num_msa_layers": 2,
                    "lora_rank": 4,
                    "mode": mode,
                    "main_sees_streams": mode == "shared",
                },
                hf,
            )
            with torch.no_grad():  # values representable in float16, the stream files' dtype
                for p in s.parameters():
                    p.copy_((torch.randn_like(p) * 0.1).half().float())
            save_streams_torch(d / "src", s)
            dst = convert(d / "src", d / "dst", dtype="float32")
            with torch.no_grad():
                main, strm = forward_with_streams(hf, s, ids)
            model, _ = load_model(dst)
            mm, ms = mlx_forward_with_streams(
                model, load_streams(dst / "speculative_streams.json", model), mx.array(ids.numpy())
            )
            print(
                f"{name:24}{mode:10}{np.abs(np.array(mm) - main.numpy()).max():>14.1e}"
                f"{np.abs(np.array(ms) - strm.numpy()).max():>16.1e}",
                flush=True,
            )
            shutil.rmtree(d)


if __name__ == "__main__":
    main()
