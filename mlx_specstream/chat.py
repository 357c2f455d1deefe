"""``specstream chat``: a terminal chat with streaming output, KV reuse across turns, and commands.

Commands: ``/reset`` (new conversation), ``/stats`` (last reply's speed and acceptance),
``/temp T``, ``/top-p P``, ``/max-tokens N``, ``/speculate on|off``, ``/help``, ``/quit``.
Ctrl-C stops the current reply, not the program. Models without a chat template are used as
plain completion: each turn's text is appended to the running transcript.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from .cache import PromptCache
from .cli import add_model_args, add_sampling_args, check_args, load_from_args
from .decode import DEFAULT_MAX_TOKENS
from .generate import cached_stream_generate
from .sample import SamplingParams

HELP = "commands: /reset /stats /temp T /top-p P /max-tokens N /speculate on|off /help /quit"


def setup_arg_parser(parser=None):
    p = parser or argparse.ArgumentParser(description="Chat with a model")
    add_model_args(p)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--no-speculate", action="store_true")
    add_sampling_args(p)
    return p


class Chat:
    def __init__(self, model, tokenizer, *, system_prompt=None, sampling=SamplingParams(),
                 max_tokens=DEFAULT_MAX_TOKENS, speculative=None):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.sampling, self.max_tokens = system_prompt, sampling, max_tokens
        self.speculative = speculative
        self.pcache = PromptCache(model)
        self.last = None
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.transcript = (self.system_prompt + "\n") if self.system_prompt else ""
        self.pcache.reset()

    def _prompt_tokens(self, user: str):
        if self.tokenizer.has_chat_template:
            msgs = self.messages + [{"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
        return self.tokenizer.encode(self.transcript + user)

    def reply(self, user: str, write=print):
        """Stream one reply; returns its text. Interrupting (Ctrl-C) keeps what was said."""
        text = ""
        gen = cached_stream_generate(self.model, self.tokenizer, self.pcache, self._prompt_tokens(user),
                                     max_tokens=self.max_tokens, sampling=self.sampling, speculative=self.speculative)
        try:
            for r in gen:
                text += r.text
                self.last = r
                write(r.text, end="", flush=True)
        except KeyboardInterrupt:
            write(" [stopped]", end="", flush=True)
        finally:
            gen.close()  # the prompt cache records what was said
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
                    write(f"[{r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s, prompt {r.prompt_tps:.1f} tok/s, "
                          f"{r.mean_accepted:.2f} tokens/step over {r.steps} steps, peak {r.peak_memory:.3f} GB]")
            elif cmd == "temp":
                self.sampling = replace(self.sampling, temp=float(arg))
                write(f"[temp {self.sampling.temp}]")
            elif cmd == "top-p":
                self.sampling = replace(self.sampling, top_p=float(arg))
                write(f"[top-p {self.sampling.top_p}]")
            elif cmd == "max-tokens":
                self.max_tokens = int(arg)
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
    chat = Chat(model, tokenizer, system_prompt=args.system_prompt,
                sampling=SamplingParams(args.temp, args.top_p, args.top_k, args.min_p),
                max_tokens=args.max_tokens, speculative=False if args.no_speculate else None)
    mode = "chat template" if tokenizer.has_chat_template else "plain completion (no chat template)"
    print(f"[{mode}; {HELP}]", flush=True)
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.startswith("/"):
            if not chat.command(line):
                return 0
            continue
        chat.reply(line)
