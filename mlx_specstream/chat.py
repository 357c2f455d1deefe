"""``specstream chat``: a terminal chat with streaming output, KV reuse across turns, and commands.

Commands: ``/reset`` (new conversation), ``/stats`` (last reply's speed and acceptance),
``/temp T``, ``/top-p P``, ``/max-tokens N``, ``/speculate on|off``, ``/help``, ``/quit``.
Ctrl-C stops the current reply, not the program. Models without a chat template are used as
plain completion: each turn's text is appended to the running transcript.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import mlx.core as mx

from .cache import PromptCache
from .cli import add_cache_args, add_model_args, add_sampling_args, check_args, kv_settings, load_from_args
from .decode import DEFAULT_MAX_TOKENS
from .errors import UserError
from .generate import cached_stream_generate, context_limit
from .sample import SamplingParams
from .tokenizer import chat_ids

MIN_REPLY = 16  # tokens a reply keeps room for when old turns are dropped


def _checked(v, lo, hi):
    if not lo <= v <= hi:  # NaN fails this too
        raise ValueError(v)
    return v


HELP = "commands: /reset /stats /temp T /top-p P /max-tokens N /speculate on|off /help /quit"


def setup_arg_parser(parser=None):
    p = parser or argparse.ArgumentParser(description="Chat with a model")
    add_model_args(p)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--no-speculate", action="store_true")
    add_sampling_args(p)
    add_cache_args(p)
    return p


class Chat:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        system_prompt=None,
        sampling=SamplingParams(),
        max_tokens=DEFAULT_MAX_TOKENS,
        speculative=None,
        kv=None,
    ):
        self.model, self.tokenizer, self.kv = model, tokenizer, kv
        self.system_prompt, self.sampling, self.max_tokens = system_prompt, sampling, max_tokens
        self.speculative = speculative
        self.pcache = PromptCache(model)
        self.last = None
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.transcript = (self.system_prompt + "\n") if self.system_prompt else ""
        self.pcache.reset()

    def _prompt_tokens(self, user: str, write=print):
        """The turn's prompt; the oldest turns are dropped (said once per drop) while it leaves no
        room for a reply in the model's context."""
        limit = context_limit(getattr(self.model, "base", self.model))
        while True:
            if self.tokenizer.has_chat_template:
                ids = chat_ids(self.tokenizer, self.messages + [{"role": "user", "content": user}])
            else:
                ids = self.tokenizer.encode(self.transcript + user)
            first = 1 if self.system_prompt else 0
            if limit is None or len(ids) < limit - MIN_REPLY or not self._drop_oldest(first):
                return ids
            write("[the conversation outgrew the context: its oldest turn was dropped]")

    def _drop_oldest(self, first: int) -> bool:
        if self.tokenizer.has_chat_template:
            if len(self.messages) - first < 2:
                return False
            del self.messages[first : first + 2]  # one user turn and its reply
        else:
            if not self.transcript:
                return False
            self.transcript = self.transcript[len(self.transcript) // 2 :]
        self.pcache.reset()  # the prefix changed: nothing cached is reusable
        return True

    def reply(self, user: str, write=print):
        """Stream one reply; returns its text. Interrupting (Ctrl-C) keeps what was said."""
        text = ""
        gen = cached_stream_generate(
            self.model,
            self.tokenizer,
            self.pcache,
            self._prompt_tokens(user, write),
            max_tokens=self.max_tokens,
            sampling=self.sampling,
            speculative=self.speculative,
            kv=self.kv,
        )
        try:
            for r in gen:
                text += r.text
                self.last = r
                write(r.text, end="", flush=True)
        except KeyboardInterrupt:
            write(" [stopped]", end="", flush=True)
        finally:
            gen.close()  # the prompt cache records what was said
            mx.clear_cache()  # mlx-lm's practice between requests: the buffer cache back to the system
        write("")
        if self.tokenizer.has_chat_template:
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        else:
            self.transcript += user + text
        return text

    def command(self, line: str, write=print) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line[1:].partition(" ")
        try:
            if cmd in ("quit", "exit", "q"):
                return False
            if cmd == "reset":
                self.reset()
                write("[conversation reset]")
            elif cmd == "stats":
                r = self.last
                if r is None:
                    write("[no reply yet]")
                else:
                    write(
                        f"[{r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s, prompt {r.prompt_tps:.1f} tok/s, "
                        f"{r.tokens_per_step:.2f} tokens/step over {r.steps} steps, peak {r.peak_memory:.3f} GB]"
                    )
            elif cmd == "temp":
                self.sampling = replace(self.sampling, temp=_checked(float(arg), 0.0, 100.0))
                write(f"[temp {self.sampling.temp}]")
            elif cmd == "top-p":
                self.sampling = replace(self.sampling, top_p=_checked(float(arg), 0.0, 1.0))
                write(f"[top-p {self.sampling.top_p}]")
            elif cmd == "max-tokens":
                self.max_tokens = int(_checked(int(arg), 1, 1 << 20))
                write(f"[max-tokens {self.max_tokens}]")
            elif cmd == "speculate":
                self.speculative = None if arg.strip() == "on" else False
                write(f"[speculate {arg.strip()}]")
            else:
                write(HELP)
        except ValueError:
            write(f"[bad value for /{cmd}: {arg!r}]")
        return True


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    check_args(args)
    model, tokenizer = load_from_args(args)
    chat = Chat(
        model,
        tokenizer,
        system_prompt=args.system_prompt,
        sampling=SamplingParams(args.temp, args.top_p, args.top_k, args.min_p),
        max_tokens=args.max_tokens,
        speculative=False if args.no_speculate else None,
        kv=kv_settings(args),
    )
    mode = "chat template" if tokenizer.has_chat_template else "plain completion (no chat template)"
    print(f"[{mode}; {HELP}]", flush=True)
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except UnicodeDecodeError:
            print("[that line is not UTF-8 text: nothing was sent]")
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        try:
            chat.reply(line)
        except UserError as e:  # the chat goes on: say what was wrong
            print(f"[{e}; the conversation is kept — /reset starts a new one]")
