import json
import signal
import socket
import subprocess
import sys
import urllib.request


from mlx_specstream.chat import Chat
from mlx_specstream.generate import generate
from mlx_specstream import load


def test_chat_reuses_kv_across_turns(hf_model):
    model, tok = load(str(hf_model("llama")[0]))
    chat = Chat(model, tok, max_tokens=12)
    out = []
    a = chat.reply("def f():", write=lambda *a, **k: out.append(a))
    assert a == generate(model, tok, "def f():", max_tokens=12)
    held = chat.pcache.cache[0].offset
    b = chat.reply("\n# next", write=lambda *a, **k: None)
    assert b == generate(model, tok, "def f():" + a + "\n# next", max_tokens=12)
    assert chat.last.prompt_tokens < len(tok.encode("def f():" + a + "\n# next")) - held + 2  # only the new part
    assert chat.command("/reset", write=lambda *a: None) and chat.pcache.cache[0].offset == 0
    assert not chat.command("/quit", write=lambda *a: None)


def test_chat_repl_in_a_pty(hf_model):
    import pexpect

    path, _ = hf_model("llama")
    child = pexpect.spawn(
        sys.executable, ["-m", "mlx_specstream", "chat", "--model", str(path), "-m", "8"], encoding="utf-8", timeout=120
    )
    child.expect(">> ")
    child.sendline("def f():")
    child.expect(">> ")
    first = child.before
    child.sendline("/stats")
    child.expect(r"tokens/step")
    child.expect(">> ")
    child.sendline("x = 1")
    child.expect(">> ")
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.expect(">> ")
    child.sendline("def f():")
    child.expect(">> ")
    assert child.before.strip() == first.strip()  # same prompt after reset: same reply
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_sigterm_is_graceful(hf_model):
    path, _ = hf_model("llama")
    port = _free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "mlx_specstream", "serve", "--model", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = p.stdout.readline()
        while line.startswith("["):  # one-line notes on stderr (e.g. which BLAS is in use) come first
            line = p.stdout.readline()
        assert "serving" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "ok"
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"prompt": "def", "max_tokens": 5}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 5
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert "server stopped" in p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_chat_refuses_nonsense_settings_and_goes_on(hf_model):
    model, tok = load(str(hf_model("llama")[0]))
    chat = Chat(model, tok, max_tokens=4)
    said = []
    for cmd in ("/temp -5", "/temp nan", "/temp inf", "/top-p 5", "/max-tokens -1", "/max-tokens 0", "/temp x"):
        assert chat.command(cmd, write=said.append)
        assert said[-1].startswith("[bad value"), (cmd, said[-1])
    assert chat.sampling.temp == 0 and chat.max_tokens == 4  # unchanged
    assert chat.reply("def f():", write=lambda *a, **k: None) is not None


def test_a_chat_that_outgrows_the_context_drops_its_oldest_turns(hf_model, monkeypatch):
    model, tok = load(str(hf_model("llama")[0]))
    monkeypatch.setattr(model.args, "max_position_embeddings", 120)
    chat = Chat(model, tok, max_tokens=6)
    notes = []

    def write(*a, **k):
        notes.append(" ".join(map(str, a)))

    for i in range(12):  # ~40 tokens a turn: the context holds three
        chat.reply(f"def function_number_{i}(a, b, c):\n    return a + b * c - {i}\n", write=write)
    assert any("oldest turn was dropped" in n for n in notes)
    assert len(tok.encode(chat.transcript)) < 120
