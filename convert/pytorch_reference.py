"""PyTorch reference of Speculative Streaming over transformers causal LMs.

This defines the checkpoint format the converter reads, and trains on GPUs with the Hugging Face
stack. A Speculative Streaming checkpoint (PyTorch side) is a folder with:

- the base model as ``save_pretrained`` writes it (``config.json``, ``*.safetensors`` or
  ``pytorch_model*.bin``, tokenizer files); in shared mode optionally a PEFT LoRA adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``) next to it or elsewhere;
- ``speculative_streams.json``: the stream config, the same keys as the MLX ``StreamConfig``;
- ``speculative_streams.safetensors`` (or ``.bin``): ``stream_embeddings`` (γ, h),
  ``pruning.down.weight`` (r, h), ``pruning.up.weight`` (h, r) and, lossless mode,
  ``lora.<i>.<module path with "__" for ".">.lora_a`` (in, r) / ``lora_b`` (r, out) for MSA layer i.

The forward is written against the families' decoder layers, called directly with an explicit
additive mask (eager attention) and explicit positions: bottom N−Ns layers on main tokens, stream
insertion ``H_t + P_j``, then the top Ns layers over ``[main ; streams]`` rows with the
multi-stream mask. Stream-only LoRA is applied with forward hooks that zero the adapter on main
rows, so main rows are exactly the base model's.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = dict(
    num_streams=3,
    num_msa_layers=2,
    mode="lossless",
    main_sees_streams=False,
    stream_positions="parent",
    tree=None,
    tree_budget=12,
    prune_threshold=0.0,
    pruning_rank=8,
    lora_rank=8,
    lora_scale=1.0,
    lora_targets=None,
    lookup=0,
    tuned_on=None,
    base=None,
    sampled=None,
    token_head_rank=0,
    token_head_space="normed",
    token_head_topk=64,
    draft_vocab=0,
)


def _base(hf):
    return hf.get_base_model() if hasattr(hf, "get_base_model") else hf


class Family:
    """The seams of a transformers causal LM that the stream forward needs."""

    def __init__(self, hf):
        self.hf = _base(hf)
        self.type = self.hf.config.model_type
        self.inner = self.hf.model.decoder if self.type == "opt" else self.hf.model

    @property
    def layers(self):
        return self.inner.layers

    def embed(self, ids, positions):
        h = self.inner.embed_tokens(ids)
        if self.type == "opt":
            if getattr(self.inner, "project_in", None) is not None:
                h = self.inner.project_in(h)
            h = h + self.inner.embed_positions.weight[positions + 2][None]
        return h

    def layer(self, i, h, mask, positions):
        kw = dict(attention_mask=mask)
        if self.type != "opt":
            pos = positions[None]
            kw.update(position_ids=pos, position_embeddings=self.inner.rotary_emb(h, position_ids=pos))
        out = self.layers[i](h, **kw)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, h):
        if self.type == "opt":
            if self.inner.final_layer_norm is not None:
                h = self.inner.final_layer_norm(h)
            if self.inner.project_out is not None:
                h = self.inner.project_out(h)
            return h
        norm = self.inner.final_layernorm if self.type == "phi" else self.inner.norm
        return norm(h)

    def head(self, h):
        return self.hf.lm_head(h)


class Adapter(nn.Module):
    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.lora_a = nn.Parameter(torch.randn(d_in, rank) * d_in**-0.5)
        self.lora_b = nn.Parameter(torch.zeros(rank, d_out))


class SpeculativeStreamsTorch(nn.Module):
    def __init__(self, config: Dict, hf):
        super().__init__()
        self.config = {**DEFAULTS, **config}
        c = self.config
        if c["token_head_rank"]:
            raise ValueError("the PyTorch reference implements the paper's independent streams (token_head_rank 0)")
        if c["mode"] != "lossless":
            c["lora_rank"] = 0
        fam = Family(hf)
        h = fam.hf.config.hidden_size
        g, r = c["num_streams"], c["pruning_rank"]
        self.stream_embeddings = nn.Parameter(torch.randn(g, h) * 0.02)
        self.pruning = nn.ModuleDict({"down": nn.Linear(h, r, bias=False), "up": nn.Linear(r, h, bias=False)})
        nn.init.zeros_(self.pruning["up"].weight)
        self.lora = nn.ModuleList()
        if c["lora_rank"]:
            n = len(fam.layers)
            for layer in fam.layers[n - c["num_msa_layers"] :]:
                d = nn.ModuleDict()
                for name, m in _linears(layer, c["lora_targets"]).items():
                    d[name.replace(".", "__")] = Adapter(m.in_features, m.out_features, c["lora_rank"])
                self.lora.append(d)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _linears(layer, targets):
    found = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n}
    found = {n: m for n, m in found.items() if "lora_" not in n and not n.endswith("base_layer")}
    return found if targets is None else {t: found[t] for t in targets}


def msa_mask(anc: torch.Tensor, owners: torch.Tensor, g: int, main_sees: bool) -> torch.Tensor:
    T, K = anc.shape[0], owners.shape[0]
    owner_of = owners.repeat_interleave(g)
    j = torch.arange(g).repeat(K)
    s2s = (owner_of[:, None] == owner_of[None, :]) & (j[None, :] <= j[:, None])
    s2m = anc[owner_of]
    m2s = (torch.arange(T)[:, None] == owner_of[None, :]) if main_sees else torch.zeros(T, K * g, dtype=torch.bool)
    return torch.cat([torch.cat([anc, m2s], 1), torch.cat([s2m, s2s], 1)], 0)


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)[None, None]


@contextmanager
def _stream_lora(fam: Family, streams: SpeculativeStreamsTorch, n_main: int, n_rows: int):
    """Hooks adding the stream-only LoRA to rows >= n_main of the MSA layers' linears."""
    c = streams.config
    handles = []
    if c["lora_rank"]:
        n = len(fam.layers)
        for i, layer in enumerate(fam.layers[n - c["num_msa_layers"] :]):
            mods = dict(layer.named_modules())
            for key, ad in streams.lora[i].items():

                def hook(mod, inp, out, ad=ad):
                    x = inp[0]
                    delta = (x @ ad.lora_a) @ ad.lora_b * c["lora_scale"]
                    if x.dim() == 2:  # some families (OPT's MLP) flatten (B, R, h) to (B·R, h)
                        rows = (torch.arange(x.shape[0], device=x.device) % n_rows) >= n_main
                        return out + delta * rows[:, None].to(delta.dtype)
                    rows = torch.arange(x.shape[1], device=x.device) >= n_main
                    return out + delta * rows[None, :, None].to(delta.dtype)

                handles.append(mods[key.replace("__", ".")].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def forward_with_streams(
    hf, streams: SpeculativeStreamsTorch, ids: torch.Tensor, owners: Optional[torch.Tensor] = None
):
    """Main logits (B, L, V) and stream logits (B, K, γ, V), streams on ``owners`` (default all)."""
    fam = Family(hf)
    c = streams.config
    B, L = ids.shape
    g, Ns = c["num_streams"], c["num_msa_layers"]
    positions = torch.arange(L)
    owners = torch.arange(L) if owners is None else owners
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    h = fam.embed(ids, positions)
    n = len(fam.layers)
    for i in range(n - Ns):
        h = fam.layer(i, h, _additive(causal, h.dtype), positions)
    s = h[:, owners][:, :, None, :] + streams.stream_embeddings[None, None].to(h.dtype)
    x = torch.cat([h, s.reshape(B, -1, h.shape[-1])], 1)
    pos_s = positions[owners].repeat_interleave(g)
    if c["stream_positions"] == "parent_plus_j":
        pos_s = pos_s + torch.arange(1, g + 1).repeat(owners.shape[0])
    mask = _additive(msa_mask(causal, owners, g, c["main_sees_streams"]), x.dtype)
    pos = torch.cat([positions, pos_s])
    with _stream_lora(fam, streams, L, x.shape[1]):
        for i in range(n - Ns, n):
            x = fam.layer(i, x, mask, pos)
    out = fam.head(fam.final_norm(x))
    return out[:, :L], out[:, L:].reshape(B, owners.shape[0], g, -1)


def early_exit_logits(hf, streams, ids):
    fam = Family(hf)
    L = ids.shape[1]
    positions = torch.arange(L)
    h = fam.embed(ids, positions)
    causal = _additive(torch.tril(torch.ones(L, L, dtype=torch.bool)), h.dtype)
    for i in range(len(fam.layers) - streams.config["num_msa_layers"]):
        h = fam.layer(i, h, causal, positions)
    return fam.head(fam.final_norm(h + streams.pruning["up"](streams.pruning["down"](h))))


def ss_loss(hf, streams, ids, loss_mask=None, alpha0=None, alpha=0.1):
    """``α0·NTP + Σ_j α·CE(stream j)`` (+ the pruning adapter's NTP); ``loss_mask`` (B, L) marks
    target tokens. α0 defaults to 0 (lossless) or 1 (shared)."""
    c = streams.config
    a0 = alpha0 if alpha0 is not None else (0.0 if c["mode"] == "lossless" else 1.0)
    x, y = ids[:, :-1], ids[:, 1:]
    m = torch.ones_like(y, dtype=torch.float32) if loss_mask is None else loss_mask[:, 1:].float()
    main, strm = forward_with_streams(hf, streams, x)
    L = x.shape[1]
    total = 0.0
    for j in range(c["num_streams"]):
        n = L - 1 - j
        if n <= 0:
            break
        ce = F.cross_entropy(strm[:, :n, j].flatten(0, 1).float(), y[:, 1 + j :].flatten(), reduction="none")
        w = m[:, 1 + j :].flatten()
        total = total + alpha * (ce * w).sum() / w.sum().clamp(min=1)
    if a0:
        ce = F.cross_entropy(main.flatten(0, 1).float(), y.flatten(), reduction="none")
        total = total + a0 * (ce * m.flatten()).sum() / m.sum().clamp(min=1)
    ee = early_exit_logits(hf, streams, x)
    ce = F.cross_entropy(ee.flatten(0, 1).float(), y.flatten(), reduction="none")
    return total + (ce * m.flatten()).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def speculative_greedy(hf, streams, prompt: List[int], max_tokens: int, tree_paths=None):
    """Reference speculative greedy decoding, written for obviousness, not speed: no KV cache,
    every candidate path is verified by a full forward pass over the sequence. Streams are on the
    last prompt token and every generated token (as in the MLX decode loop)."""
    g = streams.config["num_streams"]
    paths = sorted({tuple(p) for p in (tree_paths or [(0,) * d for d in range(1, g + 1)])}, key=len)
    leaves = [p for p in paths if not any(q[: len(p)] == p and len(q) > len(p) for q in paths)]
    k = max((p[-1] for p in paths), default=0) + 1
    start = len(prompt) - 1

    def run(seq):
        owners = torch.arange(start, len(seq))
        main, strm = forward_with_streams(hf, streams, torch.tensor([seq]), owners=owners)
        return main[0].argmax(-1), strm[0]

    pred, strm = run(list(prompt))
    out = [int(pred[-1])]
    cand = strm[-1].topk(k, dim=-1).indices  # (γ, k): drafts for the next step
    while len(out) < max_tokens:
        ctx = list(prompt) + out
        best = []
        for leaf in leaves:
            drafts = [int(cand[d, leaf[d]]) for d in range(len(leaf))]
            pred, _ = run(ctx + drafts)
            n = 0
            while n < len(drafts) and int(pred[len(ctx) - 1 + n]) == drafts[n]:
                n += 1
            if n > len(best):
                best = drafts[:n]
        pred, strm = run(ctx + best)
        out += best + [int(pred[-1])]
        cand = strm[-1].topk(k, dim=-1).indices
    return out[:max_tokens]


def save_streams_torch(path, streams: SpeculativeStreamsTorch, name: Optional[str] = None, bin_format=False):
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stem = "speculative_streams" + (f"-{name}" if name else "")
    sd = {k: v.detach().contiguous() for k, v in streams.state_dict().items()}
    if bin_format:
        torch.save(sd, path / f"{stem}.bin")
    else:
        save_file(sd, str(path / f"{stem}.safetensors"))
    (path / f"{stem}.json").write_text(json.dumps(streams.config, indent=2) + "\n")
