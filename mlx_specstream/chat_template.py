"""Chat templates rendered as the untrusted code they are. A template comes from the model folder
(or a GGUF file) and runs in jinja's sandbox, which bounds neither time nor memory: 150 bytes can
loop 10^15 times or double a string to gigabytes. So templates render in a child process —
transformers' own ``render_jinja_template``, the function ``apply_chat_template`` calls, so the
text is the same — which this process waits on for at most ``TEMPLATE_SECONDS`` and whose address
space is capped (where the OS enforces ``RLIMIT_AS``); a rendering that overruns either, or whose
text exceeds the output bound, is a named error and the child is replaced. The child is started
once (in the background at load) and serves every rendering after it."""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import threading
from typing import List, Optional

from .errors import UserError

TEMPLATE_SECONDS = 5.0  # one rendering, in wall time
TEMPLATE_MEMORY = 1 << 30  # bytes of address space the child may add once its imports are done
TEMPLATE_OUTPUT = 1 << 20  # characters, beyond 4x the messages' own text
STARTUP_SECONDS = 60.0  # the child's imports, once


def _hf(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF tokenizer


class _Renderer:
    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.ready = False
        self.lock = threading.Lock()

    def start(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlx_specstream.chat_template"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            self.ready = False

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc, self.ready = None, False

    def _read(self, seconds: float) -> bytes:
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return self.proc.stdout.readline() if ready else b""

    def render(self, job: dict, seconds: float) -> str:
        with self.lock:  # one rendering at a time: a server's threads share the child
            self.start()
            if not self.ready:  # its imports, about a second, are not the template's time
                self.ready = self._read(STARTUP_SECONDS) == b"ready\n"
                if not self.ready:
                    self._kill()
                    raise RuntimeError("the chat-template renderer did not start")
            try:
                self.proc.stdin.write(json.dumps(job).encode() + b"\n")
                self.proc.stdin.flush()
            except OSError:
                self._kill()
                raise RuntimeError("the chat-template renderer exited") from None
            line = self._read(seconds)
            if not line:
                code = self.proc.poll()
                self._kill()
                if (
                    code is not None
                ):  # e.g. an allocation past the memory bound that Python could not turn into MemoryError
                    raise UserError(
                        "the chat template's renderer died while rendering it (memory bound "
                        f"{TEMPLATE_MEMORY >> 20} MiB; exit {code})"
                    )
                raise UserError(
                    f"the chat template did not finish rendering within {seconds:g} s "
                    "(it is code from the model folder: fix or replace its chat template)"
                )
            out = json.loads(line)
            if out.get("restart"):  # memory ran out: a fresh child for the next rendering
                self._kill()
        if "error" in out:
            raise UserError(f"the chat template failed: {out['error']}")
        return out["text"]


_RENDERER = _Renderer()


def prestart() -> None:
    """Start the child now, so its imports overlap loading the model."""
    with _RENDERER.lock:
        _RENDERER.start()


def render(
    tokenizer, messages: List[dict], *, add_generation_prompt: bool = True, seconds: float = TEMPLATE_SECONDS
) -> str:
    """The tokenizer's chat template over ``messages`` as text, as ``apply_chat_template(...,
    tokenize=False)`` gives it, bounded in time, memory and output."""
    hf = _hf(tokenizer)
    try:
        template = hf.get_chat_template(None, None)
    except ValueError as e:
        raise UserError(f"this tokenizer has no usable chat template: {e}") from None
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers normalizes
    size = sum(len(str(m.get("content", ""))) for m in messages)
    job = {
        "template": template,
        "messages": messages,
        "add_generation_prompt": add_generation_prompt,
        "kwargs": dict(hf.special_tokens_map),
        "limit": TEMPLATE_OUTPUT + 4 * size,
    }
    return _RENDERER.render(job, seconds)


def template_ids(tokenizer, messages: List[dict], *, add_generation_prompt: bool = False) -> List[int]:
    """``apply_chat_template(messages)``'s token ids (the template's text, no extra special tokens)."""
    return tokenizer.encode(
        render(tokenizer, messages, add_generation_prompt=add_generation_prompt), add_special_tokens=False
    )


def _cap_memory() -> None:
    try:
        with open("/proc/self/statm") as f:  # Linux: the address space already mapped
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + TEMPLATE_MEMORY, resource.RLIM_INFINITY))
    except (OSError, ValueError):
        pass  # no /proc (macOS) or no limit allowed: the time bound still holds


def _serve() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    _cap_memory()
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            job = json.loads(line)
            text = render_jinja_template(
                conversations=[job["messages"]],
                chat_template=job["template"],
                add_generation_prompt=job["add_generation_prompt"],
                **job["kwargs"],
            )[0][0]
            if len(text) > job["limit"]:
                reply = {"error": f"its text grew to {len(text)} characters (limit {job['limit']})"}
            else:
                reply = {"text": text}
        except MemoryError:
            reply = {"error": f"it used more than {TEMPLATE_MEMORY >> 20} MiB", "restart": True}
        except Exception as e:  # noqa: BLE001 - the template's own errors, reported to the caller
            reply = {"error": f"{type(e).__name__}: {e}"[:2000]}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve()
