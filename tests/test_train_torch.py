"""The PyTorch side trains through transformers' Trainer and its output converts to MLX."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from hf_models import make_hf_model  # noqa: E402


def hf_tokenizer(path: Path, corpus: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        [corpus],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)


@pytest.mark.parametrize("mode,peft_rank", [("lossless", 0), ("shared", 4)])
def test_trainer_script_then_convert(tmp_path, mode, peft_rank):
    from convert.pytorch_train import main as train_main
    from mlx_specstream.convert import convert
    from mlx_specstream import load

    src = tmp_path / "base"
    make_hf_model("llama", src)
    text = "def add(a, b):\n    return a + b\n\n" * 30
    hf_tokenizer(src, text)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(8)))
    losses = train_main(
        [
            "--model",
            str(src),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "ss"),
            "--mode",
            mode,
            "--num-streams",
            "2",
            "--msa-layers",
            "2",
            "--steps",
            "12",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "5e-3",
            "--peft-rank",
            str(peft_rank),
        ]
    )
    assert losses[-1] < losses[0]
    assert (tmp_path / "ss" / "speculative_streams.json").exists()
    assert (tmp_path / "ss" / "adapter_config.json").exists() == bool(peft_rank)
    dst = convert(tmp_path / "ss", tmp_path / "mlx", dtype="float32")
    model, tok = load(str(dst))
    assert model.drafter.streams.config.num_streams == 2
    # converted logits equal the PyTorch side's (PEFT merged)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ss", torch_dtype=torch.float32)
    if peft_rank:
        import peft

        hf = peft.PeftModel.from_pretrained(hf, tmp_path / "ss").merge_and_unload()
    ids = [[1, 40, 7, 99, 12]]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(model.base(mx.array(ids))), ref, atol=1e-4)
