"""``specstream serve``: an OpenAI-compatible HTTP server with speculative decoding.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``. Generations run one at a time in arrival order (requests queue, none is lost);
a client that disconnects mid-stream stops its generation. Models without a chat template serve
chat requests through a plain fallback: the messages' contents joined by newlines, ending with a
newline, completed as text.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import numpy as np

from .cache import PromptCache
from .cli import add_cache_args, add_model_args, kv_settings, load_from_args
from .decode import DEFAULT_MAX_TOKENS
from .generate import cached_stream_generate, context_limit
from .sample import SamplingParams
from .tokenizer import chat_ids, token_bytes
from .errors import UserError

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
DEFAULT_MAX_TOKENS_LIMIT = 2048
DEFAULT_TIMEOUT = 30.0  # seconds a socket read or write may wait (slow or stalled clients)
DEFAULT_MAX_CONNECTIONS = 64  # open connections; more are answered 503 on the accepting thread
SHUTDOWN_GRACE = 5.0  # seconds idle and still-sending clients keep their connection after SIGTERM
DRAIN_LIMIT = 64 << 20  # an oversized body is read and dropped up to this much, so the client reads its 413
_GONE = (ConnectionError, TimeoutError)  # the peer closed, reset, or stalled past the timeout


def error_of(e: Exception, rid: str) -> "RequestError":
    """The one error map: bad input (a :class:`UserError`) is the client's 400; anything else is
    a bug — a 500 naming the request id, whose traceback is in the server's log."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, UserError):
        return RequestError(400, str(e))
    print(f"[request {rid}: bug]", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    return RequestError(500, f"internal error (request {rid}; the server's log has the traceback)", code="server_error")


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.code, "param": self.param, "code": self.code}}


# Fields clients send by default: accepted at the value that changes nothing, refused otherwise
IGNORED_UNLESS_NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "response_format": {"type": "text"},
}
MAX_TOP_LOGPROBS = 20  # OpenAI's bounds: chat top_logprobs, completions logprobs
MAX_COMPLETION_LOGPROBS = 5
UNSUPPORTED = ("echo", "tools", "tool_choice", "functions", "best_of", "suffix")


def _encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            400, f"{where} holds a lone surrogate (not valid Unicode text)", param=where.split("[")[0]
        ) from None


class _DeadlineReader(io.RawIOBase):
    """The socket as the handler reads it: a whole request (request line, headers, body) must
    arrive within ``timeout`` seconds of its first wait, however the bytes trickle, and once the
    server stops, a client still idle or sending after the grace period is dropped. Receives wait
    at most a second at a time so both limits are checked while a client trickles."""

    def __init__(self, sock, timeout: float, stopping: "threading.Event", stop_time: list):
        self.sock, self.timeout, self.stopping, self.stop_time = sock, timeout, stopping, stop_time
        self.deadline = time.monotonic() + timeout

    def readable(self):
        return True

    def readinto(self, b) -> int:
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                raise TimeoutError(f"the request did not arrive within {self.timeout:g} s")
            if self.stopping.is_set() and now >= self.stop_time[0] + SHUTDOWN_GRACE:
                raise TimeoutError("the server is stopping")
            self.sock.settimeout(min(1.0, self.deadline - now))
            try:
                return self.sock.recv_into(b)
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(self.timeout)  # writes keep the per-operation timeout


@dataclass(frozen=True)
class GenerationRequest:
    """A chat or completions request, parsed and checked once (:meth:`ModelServer.parse`)."""

    prompt: List[int]  # token ids (a chat: its template applied)
    max_tokens: int
    stop: List[str]
    stream: bool
    seed: Optional[int]
    sampling: SamplingParams
    include_usage: bool  # stream_options.include_usage
    logprobs: bool
    top_logprobs: int


class _Job:
    def __init__(self, req):
        self.req = req
        self.out: "queue.Queue" = queue.Queue()
        self.cancelled = False


class ModelServer:
    def __init__(
        self,
        model,
        tokenizer,
        model_id: str,
        *,
        api_key: Optional[str] = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
        speculative: Optional[bool] = None,
        timeout: float = DEFAULT_TIMEOUT,
        kv=None,
    ):
        self.model, self.tokenizer, self.model_id, self.kv = model, tokenizer, model_id, kv
        self.timeout = timeout
        self.api_key, self.max_body, self.max_tokens_limit = api_key, max_body, max_tokens_limit
        self.speculative = speculative
        self.pcache = PromptCache(model)
        self.created = int(time.time())
        # MLX work happens on one worker thread (MLX streams are per thread): requests queue up
        # in arrival order and run one at a time; none is dropped.
        mx.eval(model.parameters())
        self.jobs: "queue.Queue[_Job]" = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="specstream-generate", daemon=True)
        self.worker.start()

    # ---- request parsing

    def parse(self, body: bytes, chat: bool) -> "GenerationRequest":
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON: {e}")
        except RecursionError:
            raise RequestError(400, "request body is JSON nested too deeply") from None
        except ValueError as e:  # e.g. an integer past Python's 4,300-digit limit, in any field
            raise RequestError(400, f"request body has a value this server cannot read: {e}") from None
        if not isinstance(req, dict):
            raise RequestError(400, "request body must be a JSON object")
        model = req.get("model", self.model_id)
        if not isinstance(model, str):
            raise RequestError(400, "'model' must be a string", param="model")
        if model not in (self.model_id, "default"):
            raise RequestError(
                404,
                f"model {model!r} not found; this server serves {self.model_id!r}",
                code="model_not_found",
                param="model",
            )

        def number(name, default, lo, hi, kind=(int, float)):
            v = req.get(name, default)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v <= hi:
                raise RequestError(400, f"'{name}' must be a number in [{lo}, {hi}]", param=name)
            return v

        max_tokens = req.get("max_completion_tokens", req.get("max_tokens", DEFAULT_MAX_TOKENS))
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        if max_tokens > self.max_tokens_limit:
            raise RequestError(
                400,
                f"'max_tokens' {max_tokens} exceeds this server's limit {self.max_tokens_limit}",
                param="max_tokens",
            )
        temp = number("temperature", 0.0, 0.0, 2.0)
        top_p = number("top_p", 1.0, 0.0, 1.0)
        top_k = number("top_k", 0, 0, self.model.args.vocab_size - 1, kind=int)  # mlx-lm's top-k needs k < V
        min_p = number("min_p", 0.0, 0.0, 1.0)
        seed = req.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise RequestError(400, "'seed' must be an integer in [0, 2**64)", param="seed")
        if chat:  # chat: logprobs a boolean, top_logprobs 0..20 beside it; completions: logprobs 0..5
            logprobs = req.get("logprobs") or False
            if not isinstance(logprobs, bool):
                raise RequestError(400, "'logprobs' must be a boolean", param="logprobs")
            top = number("top_logprobs", 0, 0, MAX_TOP_LOGPROBS, kind=int)
            if top and not logprobs:
                raise RequestError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        else:
            top = number("logprobs", None, 0, MAX_COMPLETION_LOGPROBS, kind=int)
            logprobs, top = top is not None, top or 0
        for name in UNSUPPORTED:
            if req.get(name) not in (None, False, [], 0):
                raise RequestError(400, f"'{name}' is not supported by this server", param=name)
        for name, neutral in IGNORED_UNLESS_NEUTRAL.items():  # honoured at their neutral value, refused otherwise
            v = req.get(name)
            if (
                v is not None
                and v != neutral
                and not (
                    isinstance(neutral, (int, float))
                    and not isinstance(v, bool)
                    and isinstance(v, (int, float))
                    and v == neutral
                )
            ):
                raise RequestError(400, f"'{name}' is not supported by this server (only {neutral!r})", param=name)
        opts = req.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise RequestError(400, "'stream_options' must be an object", param="stream_options")
        stop = req.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise RequestError(400, "'stop' must be a string or a list of at most 4 strings", param="stop")
        stream = req.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be a boolean", param="stream")
        n = req.get("n", 1)
        if n is not None and (isinstance(n, bool) or n != 1):
            raise RequestError(400, "only n=1 is supported", param="n")
        prompt = self._chat_prompt(req) if chat else self._completion_prompt(req)
        limit = context_limit(self.model)
        if limit is not None and len(prompt) >= limit:
            raise RequestError(
                400,
                f"prompt is {len(prompt)} tokens; the model's context is {limit} tokens",
                code="context_length_exceeded",
                param="messages" if chat else "prompt",
            )
        return GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            stop=stop,
            stream=stream,
            seed=seed,
            sampling=SamplingParams(
                temp=float(temp), top_p=float(top_p) if top_p < 1.0 else 0.0, top_k=int(top_k), min_p=float(min_p)
            ),
            include_usage=bool((opts or {}).get("include_usage")),
            logprobs=logprobs,
            top_logprobs=top,
        )

    def _chat_prompt(self, req) -> List[int]:
        msgs = req.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
            _encodable(m["role"], f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                if not all(isinstance(p, dict) for p in content):
                    raise RequestError(400, f"messages[{i}].content parts must be objects", param="messages")
                texts = [p.get("text", "") for p in content if p.get("type") == "text"]
                if not all(isinstance(t, str) for t in texts):
                    raise RequestError(400, f"messages[{i}].content parts' 'text' must be strings", param="messages")
                content = "".join(texts)
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content must be a string", param="messages")
            _encodable(content, f"messages[{i}].content")
            clean.append({"role": m["role"], "content": content})
        if self.tokenizer.has_chat_template:  # contents as text: a user cannot forge a turn
            return chat_ids(self.tokenizer, clean)
        return self.tokenizer.encode("\n".join(m["content"] for m in clean) + "\n")

    def _completion_prompt(self, req) -> List[int]:
        p = req.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < len(self.tokenizer) for t in p):
                raise RequestError(400, "token ids in 'prompt' are outside the vocabulary", param="prompt")
            return list(p)
        if not isinstance(p, str) or not p:
            raise RequestError(400, "'prompt' must be a non-empty string (or a list of token ids)", param="prompt")
        _encodable(p, "prompt")
        return self.tokenizer.encode(p)

    # ---- generation

    def generate(self, req, on_piece=None):
        """Queue one generation and wait for it; ``on_piece(text, logprobs)`` streams text (and,
        when asked for, its tokens' log-probability entries) and returns False when the client is
        gone (the generation then stops). Returns (text, finish, usage, logprobs)."""
        job = _Job(req)
        self.jobs.put(job)
        while True:
            kind, value = job.out.get()
            if kind == "piece":
                if on_piece is not None and on_piece(*value) is False:
                    job.cancelled = True
            elif kind == "done":
                return value
            else:
                raise value

    def _work(self):
        while True:
            job = self.jobs.get()
            try:
                job.out.put(("done", self._run(job)))
            except Exception as e:  # reported to the waiting request, the worker lives on
                job.out.put(("error", e))
            finally:
                self.jobs.task_done()

    def _run(self, job):
        try:
            return self._generate(job)
        except BaseException:
            # A failure inside a compiled sampler (mlx-lm's filters thread the random state through
            # mx.compile) can leave traced placeholders in the shared state: every later sampled
            # request would fail. One request must not poison the next: a fresh state.
            mx.random.seed(int.from_bytes(os.urandom(8), "little"))
            raise

    def _generate(self, job):
        req = job.req
        if req.seed is not None:
            mx.random.seed(req.seed)
        text, emitted, last, finish, entries = "", [], None, None, [] if req.logprobs else None
        gen = cached_stream_generate(
            self.model,
            self.tokenizer,
            self.pcache,
            req.prompt,
            max_tokens=req.max_tokens,
            sampling=req.sampling,
            stop=req.stop,
            speculative=self.speculative,
            kv=self.kv,
        )
        try:
            for r in gen:
                text += r.text
                emitted += r.tokens
                last, finish = r, r.finish_reason
                if job.cancelled:
                    finish = "cancelled"
                    break
                ents = self._entries(r, req.top_logprobs) if entries is not None and r.tokens else None
                if ents:
                    entries += ents
                if r.text or ents:
                    job.out.put(("piece", (r.text, ents)))
        finally:
            gen.close()  # records what the cache kept
            mx.clear_cache()  # mlx-lm's practice between requests: the buffer cache back to the system
        usage = {
            "prompt_tokens": len(req.prompt),
            "completion_tokens": len(emitted),
            "total_tokens": len(req.prompt) + len(emitted),
            "speculative": {
                "steps": last.steps if last else 0,
                "mean_accepted_tokens": round(last.tokens_per_step, 4) if last else 0.0,
                "acceptance_by_depth": last.acceptance_by_depth if last else [],
            },
        }
        return text, finish or "length", usage, entries

    def _entries(self, r, top: int) -> List[dict]:
        """OpenAI's chat log-probability entries of a response's tokens (the target's
        log-probabilities before temperature and filters, as mlx-lm reports them)."""
        lp = np.array(r.logprobs.astype(mx.float32))  # read only when a client asked for them
        out = []
        for t, row in zip(r.tokens, lp):
            e = self._token_entry(t, float(row[t]))
            if top:
                best = np.argpartition(-row, top - 1)[:top]
                best = best[np.argsort(-row[best], kind="stable")]
                e["top_logprobs"] = [self._token_entry(int(i), float(row[i])) for i in best]
            else:
                e["top_logprobs"] = []
            out.append(e)
        return out

    def _token_entry(self, t: int, logprob: float) -> dict:
        b = token_bytes(self.tokenizer, t)
        return {"token": b.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(b)}


def chat_logprobs(entries: Optional[List[dict]]) -> Optional[dict]:
    return None if entries is None else {"content": entries}


def completion_logprobs(entries: Optional[List[dict]], offset: int = 0) -> Optional[dict]:
    """The legacy completions layout of the same entries: parallel lists, top ones as dicts."""
    if entries is None:
        return None
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection of the OpenAI API; ``model_server`` (and the timeout) is the
    :class:`ModelServer` a subclass per server binds (:func:`make_handler`)."""

    model_server: ModelServer
    protocol_version = "HTTP/1.1"
    server_version = "specstream"
    # set per server (make_handler): partial headers, a short body or a stalled reader cannot hold a thread
    timeout: float

    def log_message(self, fmt, *args):  # quiet by default
        pass

    def setup(self):
        super().setup()
        self._reader = _DeadlineReader(self.connection, self.timeout, self.server.stopping, self.server.stop_time)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        if self.server.stopping.is_set() and self.server.stop_time[0] + SHUTDOWN_GRACE <= time.monotonic():
            self.close_connection = True  # a kept-alive connection after the grace period: closed, not read
            return
        self._reader.deadline = time.monotonic() + self.timeout  # each request (and the idle wait before it)
        super().handle_one_request()

    def _send_json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """The base handler's own errors (unknown method 501, URI too long 414, headers too
        large 431, bad request line 400) as JSON like every other error, then close."""
        self.close_connection = True
        try:
            self._send_json(
                code, RequestError(code, message or explain or "bad request", code="invalid_request_error").body()
            )
        except _GONE:
            pass

    def _error(self, e: RequestError):
        try:
            self._send_json(e.status, e.body())
        except _GONE:
            pass

    def _drain(self, length: int):
        left = min(length, DRAIN_LIMIT)
        try:
            while left > 0 and (got := self.rfile.read(min(left, 1 << 16))):
                left -= len(got)
        except _GONE:
            pass

    def _client_gone(self) -> bool:
        """The peer closed its end (readable with nothing to read) while we generate."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorized(self) -> bool:
        if self.model_server.api_key is None:
            return True
        scheme, _, key = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and key.strip() == self.model_server.api_key  # the scheme is case-insensitive

    def do_GET(self):
        if self.path == "/health":
            return self._send_json(200, {"status": "ok"})
        if not self._authorized():
            return self._error(RequestError(401, "missing or wrong API key", code="invalid_api_key"))
        if self.path == "/v1/models":
            return self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.model_server.model_id,
                            "object": "model",
                            "created": self.model_server.created,
                            "owned_by": "specstream",
                        }
                    ],
                },
            )
        self._error(RequestError(404, f"unknown path {self.path}", code="not_found"))

    def do_POST(self):
        try:
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                # Drain nothing: close the connection after an unknown path.
                self.close_connection = True
                raise RequestError(404, f"unknown path {self.path}", code="not_found")
            if not self._authorized():
                self.close_connection = True
                raise RequestError(401, "missing or wrong API key", code="invalid_api_key")
            lengths = self.headers.get_all("Content-Length") or []
            if (
                len(lengths) != 1
                or not lengths[0].strip().isdigit()
                or len(lengths[0].strip()) > 18
                or self.headers.get("Transfer-Encoding")
            ):
                self.close_connection = True  # "3_6", "+36", duplicates, or with Transfer-Encoding: refused
                raise RequestError(
                    411 if not lengths else 400,
                    "exactly one Content-Length of digits is required (no Transfer-Encoding)",
                )
            length = int(lengths[0])
            if length > self.model_server.max_body:
                self.close_connection = True
                self._error(
                    RequestError(
                        413, f"request body of {length} bytes exceeds the limit of {self.model_server.max_body}"
                    )
                )
                self._drain(length)  # so the client, still sending, can read the 413 (not a reset)
                return
            try:
                body = self.rfile.read(length)
            except TimeoutError as e:  # trickled or stalled past the request deadline
                self.close_connection = True
                raise RequestError(408, f"{e}: {length}-byte body not received") from None
            chat = self.path == "/v1/chat/completions"
            req = self.model_server.parse(body, chat)
        except RequestError as e:
            return self._error(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            return self._stream(req, chat, rid)
        try:  # a client that has gone stops its generation, streamed or not
            text, finish, usage, entries = self.model_server.generate(req, on_piece=lambda *_: not self._client_gone())
        except Exception as e:  # noqa: BLE001 - the client gets a JSON error, the server lives on
            return self._error(error_of(e, rid))
        if finish == "cancelled":
            self.close_connection = True
            return
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": chat_logprobs(entries),
            }
            if chat
            else {"index": 0, "text": text, "finish_reason": finish, "logprobs": completion_logprobs(entries)}
        )
        self._send_json(
            200,
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.model_server.model_id,
                "choices": [choice],
                "usage": usage,
            },
        )

    def _stream(self, req, chat, rid):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        offset = [0]  # completions' text_offset continues across chunks

        def chunk(delta_text=None, finish=None, role=False, usage=None, entries=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": chat_logprobs(entries)}]
            else:
                lp = completion_logprobs(entries, offset[0])
                offset[0] += len(delta_text or "")
                choices = [{"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": lp}]
            c = {"id": rid, "object": obj, "created": created, "model": self.model_server.model_id, "choices": choices}
            if usage is not None:
                c = {**c, "choices": [], "usage": usage}
            return c

        def send(obj_):
            try:
                self.wfile.write(f"data: {json.dumps(obj_)}\n\n".encode())
                self.wfile.flush()
                return True
            except OSError:
                return False

        if chat and not send(chunk(role=True, delta_text="")):
            return
        try:
            text, finish, usage, _ = self.model_server.generate(
                req, on_piece=lambda t, ents: send(chunk(delta_text=t, entries=ents))
            )
        except Exception as e:  # noqa: BLE001 - headers are sent: an SSE error event, then [DONE]
            err = error_of(e, rid)
            finish = usage = None
            send({"error": err.body()["error"]})
        if finish == "cancelled":
            return
        if finish is not None:
            send(chunk(finish=finish, delta_text=None if chat else ""))
            if req.include_usage:
                send(chunk(usage=usage))
        try:
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:
            pass


def make_handler(model_server: ModelServer) -> type:
    return type("Handler", (Handler,), {"model_server": model_server, "timeout": model_server.timeout})


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in flight (each bounded by the timeout)
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections: int = DEFAULT_MAX_CONNECTIONS):
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.stopping = threading.Event()
        self.stop_time = [0.0]
        self._open = 0
        self._open_lock = threading.Lock()

    def stop(self):
        """Stop accepting; idle and still-sending clients are dropped after the grace period,
        requests already read run to the end."""
        self.stop_time[0] = time.monotonic()
        self.stopping.set()
        self.shutdown()

    def process_request(self, request, client_address):
        with self._open_lock:
            full = self._open >= self.max_connections
            self._open += not full
        if full:  # answered here without a thread: a flood of connections cannot grow the thread count
            body = json.dumps(
                RequestError(
                    503, f"too many open connections (limit {self.max_connections})", code="server_busy"
                ).body()
            ).encode()
            try:
                request.setblocking(False)
                request.send(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if isinstance(e, OSError):  # a socket error is a client that went away: one line, not a traceback
            print(
                f"[client {client_address[0]}:{client_address[1]} disconnected: {type(e).__name__}]",
                file=sys.stderr,
                flush=True,
            )
        else:
            super().handle_error(request, client_address)


def make_server(
    model_server: ModelServer, host: str = "127.0.0.1", port: int = 8080, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> ThreadingHTTPServer:
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    if not 1 <= max_connections <= 100_000:
        raise UserError(f"--max-connections must be in 1..100000, got {max_connections}")
    try:
        return _Server((host, port), make_handler(model_server), max_connections)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def setup_arg_parser(parser=None):
    p = parser or argparse.ArgumentParser(description="OpenAI-compatible server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="request size limit (bytes)")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT)
    p.add_argument("--no-speculate", action="store_true")
    add_cache_args(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds a whole request may take to arrive, and a socket write may wait, "
        "before the connection is dropped",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="open connections at once; more are answered 503",
    )
    return p


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    model, tokenizer = load_from_args(args)
    model_id = args.model or "specstream-default"
    ms = ModelServer(
        model,
        tokenizer,
        model_id,
        api_key=args.api_key,
        max_body=args.max_body,
        max_tokens_limit=args.max_tokens_limit,
        speculative=False if args.no_speculate else None,
        kv=kv_settings(args),
        timeout=args.timeout,
    )
    httpd = make_server(ms, args.host, args.port, args.max_connections)

    def stop(*_):  # graceful: stop accepting, let the running requests finish
        threading.Thread(target=httpd.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving {model_id} on http://{args.host}:{httpd.server_address[1]} (OpenAI API under /v1)", flush=True)
    httpd.serve_forever()
    httpd.socket.close()  # new connections are refused from now on
    print("stopping: finishing the requests in flight", flush=True)
    httpd.server_close()  # waits for the handlers, which wait for their generations
    print("server stopped", flush=True)
    return 0
