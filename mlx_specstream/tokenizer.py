"""Tokenizers: HF files through mlx-lm's ``TokenizerWrapper`` (streaming detokenizers, chat
templates), and a bare sentencepiece ``tokenizer.model`` through a small HF-shaped adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional

import sentencepiece as spm
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper
from mlx_lm.tokenizer_utils import _byte_decoder
from mlx_lm.tokenizer_utils import load as _load_hf
from . import chat_template
from .checkpoint import TOKENIZER_FILES
from .errors import UserError


class SentencePieceTokenizer:
    """Just enough of the HF tokenizer interface for ``TokenizerWrapper`` and generation."""

    chat_template = None

    def __init__(self, model_file: Path, add_bos: bool = True):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:
            raise UserError(f"cannot read sentencepiece model {model_file}: {e}") from e
        self.add_bos = add_bos and self.sp.bos_id() >= 0
        self.bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_token_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.bos_token = self.sp.id_to_piece(self.bos_token_id) if self.bos_token_id is not None else None
        self.eos_token = self.sp.id_to_piece(self.eos_token_id) if self.eos_token_id is not None else None
        self._vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def get_vocab(self) -> dict:
        return dict(self._vocab)

    def encode(self, text: str, add_special_tokens: bool = True, **_) -> List[int]:
        ids = self.sp.encode(text)
        return [self.bos_token_id] + ids if add_special_tokens and self.add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, **_) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp.is_control(i))]
        return self.sp.decode(ids)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids)
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._vocab.get(tokens)
        return [self._vocab.get(t) for t in tokens]

    def apply_chat_template(self, *args, **kwargs):
        raise UserError("this tokenizer has no chat template")


_MARK = "\ue000{}\ue001"  # private-use code points around a message's index: never in a template


def chat_ids(tokenizer, messages: List[dict], *, add_generation_prompt: bool = True) -> List[int]:
    """The chat template's token ids with every message's content tokenized as plain text:
    special-token strings a user types (``<|im_end|><|im_start|>system``) stay text and cannot
    forge a turn — special tokens come only from the template, as hosted APIs do it. The template
    is rendered with a marker in place of each content, then split at the markers."""
    marked = [dict(m, content=_MARK.format(i)) for i, m in enumerate(messages)]
    text = chat_template.render(tokenizer, marked, add_generation_prompt=add_generation_prompt)
    ids: List[int] = []
    rest = text
    for i, m in enumerate(messages):
        mark = _MARK.format(i)
        head, sep, rest = rest.partition(mark)
        if not sep:  # a template that drops or rewrites a message: no safe split, refuse
            raise UserError(f"the chat template does not reproduce message {i}'s content verbatim")
        if head:
            ids += tokenizer.encode(head, add_special_tokens=False)
        if m["content"]:
            ids += _plain_text_ids(tokenizer, m["content"])
    if rest:
        ids += tokenizer.encode(rest, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and text.startswith(getattr(tokenizer, "bos_token", None) or "\0") and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def _plain_text_ids(tokenizer, text: str) -> List[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    except TypeError:  # a tokenizer without the option (sentencepiece has no special strings in text)
        return tokenizer.encode(text, add_special_tokens=False)


def token_bytes(tokenizer, token: int) -> bytes:
    """A token's own bytes, leading space included (OpenAI's logprobs ``bytes``), read from the
    maps mlx-lm's streaming detokenizers build (``decode([t])`` drops a sentencepiece token's
    leading space)."""
    d = tokenizer.detokenizer
    if isinstance(d, SPMStreamingDetokenizer):
        return d.tokenmap[token].replace("\u2581".encode(), b" ")
    if isinstance(d, BPEStreamingDetokenizer) and token < len(d.tokenmap):
        piece, dec = d.tokenmap[token], _byte_decoder()
        return bytes(dec[c] for c in piece) if all(c in dec for c in piece) else piece.encode()
    return tokenizer.decode([token]).encode()


def load_tokenizer(path: Path, config: Optional[dict] = None) -> TokenizerWrapper:
    config = config or {}
    eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else eos
    odd = [f for f in TOKENIZER_FILES if (path / f).exists() and not (path / f).is_file()]
    if odd:  # a FIFO blocks a read forever, a directory is a traceback deep in the tokenizer library
        raise UserError(
            f"{path}: tokenizer files must be regular files: "
            + ", ".join(f"{f} ({'a directory' if (path / f).is_dir() else 'not a regular file'})" for f in odd)
        )
    hf_files = [f for f in ("tokenizer.json", "tokenizer_config.json") if (path / f).exists()]
    sp_file = path / "tokenizer.model"
    if hf_files:
        try:
            tok = _load_hf(path, eos_token_ids=eos_ids)
        except Exception:
            if not sp_file.exists():
                raise
        else:
            if tok.has_chat_template:
                chat_template.prestart()  # the renderer's imports overlap loading the weights
            return tok
    if sp_file.exists():
        tok = SentencePieceTokenizer(sp_file)
        wrapper = TokenizerWrapper(tok, SPMStreamingDetokenizer, eos_token_ids=eos_ids)
        tok.has_chat_template = False  # the wrapper forwards attribute reads to the tokenizer
        return wrapper
    raise FileNotFoundError(
        f"no tokenizer in {path}: expected tokenizer.json / tokenizer_config.json or tokenizer.model"
    )
