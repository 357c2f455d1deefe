"""Fine-tune speculative streams in PyTorch with the Hugging Face ``Trainer`` (multi-GPU through
``accelerate``/``torchrun`` like any Trainer script), then save a checkpoint for
``specstream convert``.

    python convert/pytorch_train.py --model hf_folder --data train.jsonl --out ss_ckpt \\
        --mode lossless --num-streams 4 --msa-layers 4 --steps 1000
    specstream convert --torch-path ss_ckpt --mlx-path ss_mlx

Data: JSONL with ``{"text": ...}`` records. The base is frozen in lossless mode; in shared mode
pass ``--peft-rank R`` to train a PEFT LoRA shared by main and stream rows (saved next to the
checkpoint, merged by the converter).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert.pytorch_reference import SpeculativeStreamsTorch, save_streams_torch, ss_loss  # noqa: E402


class SSModule(torch.nn.Module):
    """What the Trainer optimises: the HF model (frozen, or PEFT-wrapped) plus the streams."""

    def __init__(self, hf, streams):
        super().__init__()
        self.hf, self.streams = hf, streams

    def forward(self, input_ids, loss_mask=None, **_):
        return {"loss": ss_loss(self.hf, self.streams, input_ids, loss_mask)}


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, path, tokenizer, seq_len):
        self.rows = []
        for ln, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}:{ln}: records need a 'text' string")
            ids = tokenizer(rec["text"])["input_ids"]
            for s in range(0, max(len(ids) - 1, 1), seq_len):
                w = ids[s : s + seq_len + 1]
                if len(w) > 2:
                    self.rows.append(w + [0] * (seq_len + 1 - len(w)))
                    self.rows[-1] = (self.rows[-1], len(w))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids, n = self.rows[i]
        mask = [1] * n + [0] * (len(ids) - n)
        return {"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask)}


def main(argv=None):
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["lossless", "shared"], default="lossless")
    ap.add_argument("--num-streams", type=int, default=4)
    ap.add_argument("--msa-layers", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=8, help="stream-only LoRA (lossless)")
    ap.add_argument("--peft-rank", type=int, default=0, help="shared LoRA through PEFT (shared mode)")
    ap.add_argument("--main-sees-streams", action="store_true")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    args = ap.parse_args(argv)

    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    hf.requires_grad_(False)
    if args.mode == "shared" and args.peft_rank:
        import peft

        n = hf.config.num_hidden_layers
        from convert.pytorch_reference import Family

        leaf = sorted(
            {name.split(".")[-1] for name, m in Family(hf).layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
        )
        hf = peft.get_peft_model(
            hf,
            peft.LoraConfig(
                r=args.peft_rank,
                lora_alpha=2 * args.peft_rank,
                target_modules=leaf,
                layers_to_transform=list(range(n - args.msa_layers, n)),
            ),
        )
    streams = SpeculativeStreamsTorch(
        {
            "num_streams": args.num_streams,
            "num_msa_layers": args.msa_layers,
            "mode": args.mode,
            "main_sees_streams": args.main_sees_streams,
            "lora_rank": args.lora_rank,
        },
        hf,
    )
    module = SSModule(hf, streams)
    data = TextDataset(args.data, tok, args.seq_len)
    targs = transformers.TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=min(50, args.steps // 10),
        logging_steps=max(1, args.steps // 20),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = transformers.Trainer(model=module, args=targs, train_dataset=data)
    trainer.train()
    out = Path(args.out)
    if hasattr(hf, "peft_config"):
        hf.save_pretrained(out / "adapter")
        for f in (out / "adapter").iterdir():
            shutil.copy(f, out / f.name)  # adapter_config.json + adapter_model.* next to the base
        base = hf.unload()  # the unchanged base weights, without the LoRA modules
    else:
        base = hf
    base.save_pretrained(out)
    tok.save_pretrained(out)
    save_streams_torch(out, streams)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}))
    return losses


if __name__ == "__main__":
    main()
