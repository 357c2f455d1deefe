import contextlib
import http.client
import json
import socket
import threading

import mlx.core as mx
import pytest

from mlx_specstream.errors import UserError
from mlx_specstream.generate import generate
from mlx_specstream.server import ModelServer, make_server
from mlx_specstream.drafters import StreamDrafter
from mlx_specstream import load

API_KEY = "sekret"


@contextlib.contextmanager
def serving(ms):
    """``ms`` served on a free local port, in a thread; yields the HTTP server."""
    httpd = make_server(ms, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def served():
    model, tok = load()  # the embedded default model, with its lossless streams
    assert isinstance(model.drafter, StreamDrafter)
    with serving(ModelServer(model, tok, "tiny", api_key=API_KEY, max_body=40000, max_tokens_limit=300)) as httpd:
        yield httpd.server_address[1], model, tok


def client(port, key=API_KEY):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)


def raw(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    h = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    if body is not None and "Content-Length" not in h:
        h["Content-Length"] = str(len(body))
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def test_openai_chat_and_completion_stream_and_not(served):
    port, model, tok = served
    cl = client(port)
    assert [m.id for m in cl.models.list().data] == ["tiny"]
    msgs = [{"role": "user", "content": "def add(a, b):"}]
    full = cl.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens == 40 and full.choices[0].finish_reason == "length"
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    spec = full.usage.model_extra["speculative"]
    assert 1 <= spec["steps"] <= 40 and spec["mean_accepted_tokens"] >= 40 / spec["steps"] - 1e-3
    # the plain fallback (no chat template): contents joined by newlines, ending with one
    assert text == generate(model, tok, "def add(a, b):\n", max_tokens=40)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in cl.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == text
    comp = cl.completions.create(model="tiny", prompt="import os\n", max_tokens=30, temperature=0)
    sc = "".join(
        c.choices[0].text
        for c in cl.completions.create(model="tiny", prompt="import os\n", max_tokens=30, temperature=0, stream=True)
        if c.choices
    )
    assert comp.choices[0].text == sc == generate(model, tok, "import os\n", max_tokens=30)
    assert comp.choices[0].finish_reason == "length"


def test_logprobs_for_chat_and_completions_streamed_and_not(served):
    """OpenAI's ``logprobs``/``top_logprobs``: the target's log-probability of every emitted token
    (greedy: the top one), the same streamed or not, in each endpoint's layout."""
    port, model, tok = served
    cl = client(port)
    msgs = [{"role": "user", "content": "def add(a, b):"}]
    full = cl.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3
    )
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 24
    joined, text = "".join(e.token for e in content), full.choices[0].message.content
    assert joined in (text, " " + text)  # a token's own text; sentencepiece's detokenizer drops the first space
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == e.logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert bytes(e.bytes).decode() == e.token
    chunks = [
        c
        for c in cl.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3, stream=True
        )
        if c.choices
    ]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = cl.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked for: none
    comp = cl.completions.create(model="tiny", prompt="import os\n", max_tokens=16, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 16
    assert "".join(lp.tokens) in (comp.choices[0].text, " " + comp.choices[0].text) and lp.text_offset[0] == 0
    assert all(len(d) <= 2 and max(d.values()) == v for d, v in zip(lp.top_logprobs, lp.token_logprobs))
    sc = [
        c.choices[0].logprobs
        for c in cl.completions.create(
            model="tiny", prompt="import os\n", max_tokens=16, temperature=0, logprobs=2, stream=True
        )
        if c.choices
    ]
    assert [t for x in sc if x for t in x.tokens] == lp.tokens
    assert [o for x in sc if x for o in x.text_offset] == lp.text_offset


def test_stop_seed_and_usage_in_stream(served):
    port, model, tok = served
    cl = client(port)
    ref = generate(model, tok, "x = 1\n", max_tokens=40)
    stop = ref[10:12]
    r = cl.completions.create(model="tiny", prompt="x = 1\n", max_tokens=40, stop=[stop])
    assert r.choices[0].text == ref[: ref.index(stop)] and r.choices[0].finish_reason == "stop"
    a = cl.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=1.0, seed=7).choices[0].text
    b = cl.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=1.0, seed=7).choices[0].text
    assert a == b
    chunks = list(
        cl.completions.create(
            model="tiny", prompt="x", max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.completion_tokens == 10


def test_auth_and_bad_requests(served):
    import openai

    port, _, _ = served
    with pytest.raises(openai.AuthenticationError):
        client(port, key="wrong").models.list()
    st, _ = raw(port, "GET", "/health", headers={"Authorization": ""})
    assert st == 200
    cases = [
        (b"{not json", 400),
        (b"[1,2]", 400),
        (json.dumps({"messages": "hi"}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}).encode(), 404),
        (json.dumps({"messages": [{"role": "user", "content": "x " * 4000}]}).encode(), 400),
    ]
    for body, status in cases:
        st, data = raw(port, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert st == status, (body[:60], data)
        assert "error" in json.loads(data)
    st, data = raw(port, "POST", "/v1/completions", b"x" * 50001)
    assert st == 413
    st, data = raw(port, "POST", "/v1/nope", b"{}")
    assert st == 404
    st, data = raw(
        port,
        "POST",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x " * 4000}]}).encode(),
    )
    assert json.loads(data)["error"]["code"] == "context_length_exceeded"


def test_concurrent_clients_and_disconnect(served):
    port, model, tok = served
    # A client that disconnects mid-stream.
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "def", "max_tokens": 300, "stream": True}).encode()
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + API_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    s.recv(200)
    s.close()
    refs = {i: generate(model, tok, f"v{i} = ", max_tokens=12) for i in range(4)}
    results, errors = {}, []

    def one(i):
        try:
            r = client(port).completions.create(model="tiny", prompt=f"v{i % 4} = ", max_tokens=12, temperature=0)
            results[i] = r.choices[0].text
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 20
    assert all(results[i] == refs[i % 4] for i in range(20))
    assert raw(port, "GET", "/health")[0] == 200


def _raw_request(port, head: bytes, body: bytes = b""):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return int(data.split(b" ", 2)[1]), data


def test_valid_json_with_bad_values_gets_a_named_400(served):
    port, _, _ = served
    m = [{"role": "user", "content": "x"}]
    cases = [
        ({"messages": m, "seed": -1}, "seed"),
        ({"messages": m, "seed": 2**64}, "seed"),
        ({"messages": m, "seed": 10**30}, "seed"),
        ({"messages": m, "stream_options": "yes"}, "stream_options"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
        ({"messages": m, "logprobs": "yes"}, "logprobs"),
        ({"messages": m, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": m, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": m, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": m, "top_k": -1}, "top_k"),
        ({"messages": m, "min_p": 2}, "min_p"),
    ]
    for req, param in cases:
        st, data = raw(port, "POST", "/v1/chat/completions", json.dumps(req).encode())
        assert st == 400, (req, data)
        assert json.loads(data)["error"]["param"] == param
    st, data = raw(port, "POST", "/v1/chat/completions", b'{"messages": ' + b"[" * 15000 + b"]" * 15000 + b"}")
    assert st == 400 and "nested too deeply" in json.loads(data)["error"]["message"]
    # a lone surrogate, escaped in valid JSON
    body = b'{"messages": [{"role": "user", "content": "x\\ud800y"}]}'
    st, data = raw(port, "POST", "/v1/chat/completions", body)
    assert st == 400 and "surrogate" in json.loads(data)["error"]["message"]
    st, data = raw(port, "POST", "/v1/completions", b'{"prompt": "\\udfff"}')
    assert st == 400
    # honoured sampling fields: top_k=1 is greedy whatever the temperature
    req = {"messages": m, "max_tokens": 8, "temperature": 1.5, "top_k": 1, "seed": 3}
    greedy = {"messages": m, "max_tokens": 8}
    a = json.loads(raw(port, "POST", "/v1/chat/completions", json.dumps(req).encode())[1])
    b = json.loads(raw(port, "POST", "/v1/chat/completions", json.dumps(greedy).encode())[1])
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_strict_content_length_and_case_insensitive_bearer(served):
    port, _, _ = served
    body = json.dumps({"prompt": "def", "max_tokens": 2}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: %s\r\n%s\r\n"
    auth = f"Bearer {API_KEY}".encode()
    for extra in (
        b"Content-Length: 3_6\r\n",
        b"Content-Length: +36\r\n",
        b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(body), len(body)),
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(body),
    ):
        st, _ = _raw_request(port, head % (auth, extra), body)
        assert st in (400, 411), extra
    st, _ = _raw_request(port, head % (f"bearer {API_KEY}".encode(), b"Content-Length: %d\r\n" % len(body)), body)
    assert st == 200


@pytest.fixture
def small_server(served):
    """A second server on the same model with a short socket timeout and a recording worker."""
    _, model, tok = served

    class Recording(ModelServer):
        finishes = []

        def _generate(self, job):
            if job.req.prompt and job.req.max_tokens == 16:
                from mlx_lm.sample_utils import apply_top_k

                apply_top_k(mx.zeros((1, 4)), 10)  # raises while tracing: the random state is left traced
            if job.req.prompt and job.req.max_tokens == 13:
                raise RuntimeError("boom")  # a generation that fails after the request was accepted
            if job.req.prompt and job.req.max_tokens == 14:
                raise ValueError("[matmul] Last dimension of first input with shape (1,8) must match")  # MLX's
            if job.req.prompt and job.req.max_tokens == 15:
                raise UserError("the request names something wrong")
            out = super()._generate(job)
            self.finishes.append(out[1])
            return out

    ms = Recording(model, tok, "tiny", max_body=40000, timeout=1.0)
    with serving(ms) as httpd:
        yield httpd.server_address[1], ms, httpd


def _plain(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request(method, path, body=body, headers={"Content-Length": str(len(body or b""))})
    r = c.getresponse()
    return r.status, r.read()


def test_a_bug_is_a_500_with_a_request_id_and_bad_input_a_400(small_server, capsys):
    """MLX raises ValueError for its own shape errors: that is a bug (500, traceback logged under
    the request id), never the client's invalid_request_error."""
    port, _, _ = small_server
    st, data = _plain(port, "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 14}).encode())
    err = json.loads(data)["error"]
    assert st == 500 and err["code"] == "server_error"
    rid = err["message"].split("request ")[1].split(";")[0]
    log = capsys.readouterr().err
    assert f"[request {rid}: bug]" in log and "[matmul] Last dimension" in log and "Traceback" in log
    st, data = _plain(port, "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 15}).encode())
    assert st == 400 and json.loads(data)["error"]["message"] == "the request names something wrong"


def test_a_failed_request_leaves_sampling_working_for_the_next(small_server, served):
    port, _, _ = small_server
    body = {"prompt": "x", "max_tokens": 16, "temperature": 0.8}
    st, _ = _plain(port, "POST", "/v1/completions", json.dumps(body).encode())
    assert st == 500
    st, data = _plain(port, "POST", "/v1/completions", json.dumps(dict(body, max_tokens=5)).encode())
    assert st == 200, data  # a 500 for every later sampled request before the fix
    vocab = served[1].args.vocab_size  # top_k at the vocabulary: refused by name, not traced
    st, data = _plain(port, "POST", "/v1/completions", json.dumps(dict(body, max_tokens=5, top_k=vocab)).encode())
    assert st == 400 and "top_k" in json.loads(data)["error"]["message"]


def test_an_error_after_the_headers_is_an_sse_error_event_then_done(small_server):
    port, _, _ = small_server
    st, data = _plain(
        port, "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 13, "stream": True}).encode()
    )
    events = [e[len("data: ") :] for e in data.decode().split("\n\n") if e]
    assert st == 200 and json.loads(events[-2])["error"]["code"] == "server_error" and events[-1] == "[DONE]"
    st, data = _plain(port, "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 13}).encode())
    assert st == 500 and "request cmpl-" in json.loads(data)["error"]["message"]  # the traceback is in the log


def test_stalled_clients_time_out_and_free_their_thread(small_server):
    port, _, _ = small_server
    for partial in (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt"',
    ):  # short body
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(partial)
        while s.recv(65536):  # the server closes it after its 1 s timeout (else: socket.timeout at 20 s)
            pass
        s.close()
    assert _plain(port, "GET", "/health")[0] == 200


def _trickle(port, data: bytes, every: float, stop: threading.Event):
    """Sends ``data`` one byte per ``every`` seconds until the server closes or ``stop`` is set."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        for b in data:
            if stop.is_set():
                break
            s.sendall(bytes([b]))
            stop.wait(every)
    except OSError:
        pass  # the server dropped it
    s.close()


def test_a_trickling_client_is_dropped_at_the_request_deadline(small_server):
    """One byte every 0.3 s never trips a 1 s per-read timeout: the whole request has 1 s, for the
    headers and for the body (that one gets a 408 naming the deadline)."""
    import time

    port, _, _ = small_server
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n"
    for slow_headers in (True, False):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        t0 = time.monotonic()
        if not slow_headers:
            s.sendall(head)
        got = b""
        try:
            for b in (head if slow_headers else b"") + b"{}" * 20:
                s.sendall(bytes([b]))
                time.sleep(0.3)
                if time.monotonic() - t0 > 6:
                    break
        except OSError:
            pass
        s.settimeout(10)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        s.close()
        assert time.monotonic() - t0 < 4, "the trickling client held its connection past the deadline"
        if not slow_headers:
            assert b" 408 " in got and b"not received" in got, got
    assert _plain(port, "GET", "/health")[0] == 200


def test_open_connections_are_bounded_and_the_rest_answered_503(small_server):
    import time

    ms = small_server[1]
    httpd = make_server(ms, "127.0.0.1", 0, max_connections=3)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        time.sleep(0.3)
        st, data = _plain(port, "GET", "/health")
        assert st == 503 and "too many open connections (limit 3)" in json.loads(data)["error"]["message"]
        for s in idle:
            s.close()
        deadline = time.time() + 10
        while _plain(port, "GET", "/health")[0] != 200:  # the slots free as their handlers end
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(UserError, match="--max-connections"):
        make_server(ms, "127.0.0.1", 0, max_connections=0)


def test_sigterm_drops_trickling_and_idle_clients_after_the_grace_period():
    """A client sending a byte a second (and one connected, sending nothing) no longer keeps the
    server from stopping: it exits within the grace period plus a few seconds."""
    import signal
    import time

    from mlx_specstream.server import SHUTDOWN_GRACE

    proc, port = _serve_process("--timeout", "120")
    stop = threading.Event()
    t = threading.Thread(target=_trickle, args=(port, b"GET /health HTTP/1.1\r\n" * 10, 1.0, stop), daemon=True)
    t.start()
    idle = socket.create_connection(("127.0.0.1", port), timeout=30)
    time.sleep(1.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=SHUTDOWN_GRACE + 10)[0]
    finally:
        stop.set()
        idle.close()
        proc.kill()
    assert proc.returncode == 0 and "server stopped" in out, out
    assert time.monotonic() - t0 < SHUTDOWN_GRACE + 5


def test_a_non_streamed_request_whose_client_left_is_cancelled(small_server):
    import time

    port, ms, _ = small_server
    body = json.dumps({"prompt": "def", "max_tokens": 300}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    s.close()
    deadline = time.time() + 60
    while not ms.finishes and time.time() < deadline:
        time.sleep(0.05)
    assert ms.finishes == ["cancelled"]


def test_an_oversized_body_gets_a_413_the_client_can_read(small_server):
    port, _, _ = small_server
    st, data = _plain(port, "POST", "/v1/completions", b"x" * (5 << 20))  # a standard client sends it all first
    assert st == 413 and "exceeds the limit" in json.loads(data)["error"]["message"]


def test_a_client_disconnect_is_logged_as_one_line(small_server, capsys):
    _, _, httpd = small_server
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        httpd.handle_error(None, ("10.0.0.1", 5555))
    err = capsys.readouterr().err
    assert err.strip() == "[client 10.0.0.1:5555 disconnected: BrokenPipeError]"


def test_port_in_use_or_invalid_is_a_one_line_error(capsys):
    from mlx_specstream.cli import main as cli

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    for port, msg in ((busy.getsockname()[1], "cannot listen on 127.0.0.1"), (70000, "--port must be in 0..65535")):
        assert cli(["serve", "--port", str(port)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("error: ") and msg in err[-1], err
    busy.close()


def _serve_process(*args):
    """``specstream serve`` in a subprocess on a free port: (process, port) once it serves."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_specstream.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ},
    )
    line = proc.stdout.readline()
    while "serving" not in line:
        assert line, "the server did not start"
        line = proc.stdout.readline()
    return proc, int(line.split("http://127.0.0.1:")[1].split()[0])


def test_sigterm_refuses_new_connections_and_finishes_the_request_in_flight(tmp_path):
    import signal
    import time

    proc, port = _serve_process()
    result = {}

    def long_request():
        result["r"] = _plain(
            port, "POST", "/v1/completions", json.dumps({"prompt": "def", "max_tokens": 1500}).encode()
        )
        result["done_at"] = time.time()

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 30
    refused_at = None
    while time.time() < deadline and refused_at is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            time.sleep(0.1)
        except (ConnectionRefusedError, ConnectionResetError):  # a probe queued when the listener closes is reset
            refused_at = time.time()
    t.join(120)
    out = proc.communicate(timeout=120)[0]
    assert refused_at is not None and refused_at < result["done_at"], out  # refused while the request still ran
    assert result["r"][0] == 200 and json.loads(result["r"][1])["choices"][0]["finish_reason"] in ("length", "stop")
    assert proc.returncode == 0 and "server stopped" in out


def test_every_request_gets_a_json_answer_and_every_field_is_checked(small_server):
    """Valid JSON that used to kill a connection (huge integers anywhere, a 5,000-digit
    Content-Length, a lone surrogate in a role), fields the server cannot honour unless neutral,
    wrongly typed stop and n, and the base handler's own errors (unknown method, URI too long):
    each gets a JSON error body naming the problem."""
    port = small_server[0]
    m = [{"role": "user", "content": "x"}]
    for body, named in [
        (b'{"messages": [{"role": "user", "content": "x"}], "unknown": ' + b"9" * 5000 + b"}", "cannot read"),
        (b'{"messages": [{"role": "us\\ud800er", "content": "x"}]}', "surrogate"),
        (json.dumps({"messages": m, "presence_penalty": 0.5}).encode(), "presence_penalty"),
        (json.dumps({"messages": m, "logit_bias": {"5": 3}}).encode(), "logit_bias"),
        (json.dumps({"messages": m, "response_format": {"type": "json_object"}}).encode(), "response_format"),
        (json.dumps({"messages": m, "stop": {}}).encode(), "stop"),
        (json.dumps({"messages": m, "stop": 0}).encode(), "stop"),
        (json.dumps({"messages": m, "stop": False}).encode(), "stop"),
        (json.dumps({"messages": m, "n": True}).encode(), "n=1"),
    ]:
        st, data = _plain(port, "POST", "/v1/chat/completions", body)
        assert st == 400 and named in json.loads(data)["error"]["message"], (body[:80], data[:200])
    ok = {
        "messages": m,
        "max_tokens": 2,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "n": 1,
        "stop": None,
    }
    assert _plain(port, "POST", "/v1/chat/completions", json.dumps(ok).encode())[0] == 200
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n"
    st, data = _raw_request(port, head)
    assert st == 400 and b'"error"' in data
    st, data = _raw_request(port, b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert st == 501 and json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    st, data = _raw_request(port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert st == 414 and json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
