"""The package's structure: no import circle, heavy optional dependencies only inside the
functions that need them, and each default declared once."""

import ast
import dataclasses
from pathlib import Path

import mlx_specstream

PKG = Path(mlx_specstream.__file__).parent
OPTIONAL = {"torch", "transformers", "peft", "matplotlib", "gguf"}


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, p, ast.parse(p.read_text())


def _resolve(name, path, node):
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if node.level:
        base = base[: len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module


def test_no_import_circle():
    mods = {name: tree for name, _, tree in _modules()}
    paths = {name: p for name, p, _ in _modules()}
    graph = {}
    for name, tree in mods.items():
        deps = set()
        for node in tree.body:  # module-level imports: what importing the module runs
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, paths[name], node)
                if target and target.startswith("mlx_specstream"):
                    for a in node.names:  # `from .pkg import mod` imports a submodule
                        deps.add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
        graph[name] = {d for d in deps if d in mods and d != name}
    # a package's __init__ importing its own submodules is not a circle
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = 1
        for d in graph[n]:
            if d.startswith(n + ".") or n.startswith(d + ".") and paths[d].name == "__init__.py":
                continue
            if state.get(d) == 1:
                cycle.append(stack + [n, d])
            elif d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    assert not cycle, cycle


def test_function_local_imports_only_for_optional_dependencies():
    found = []
    for name, _, tree in _modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in ast.walk(fn):
                    if isinstance(n, ast.Import):
                        mods = [a.name for a in n.names]
                    elif isinstance(n, ast.ImportFrom):
                        mods = ["." * n.level + (n.module or "")]
                    else:
                        continue
                    found += [f"{name}:{n.lineno} {m}" for m in mods if m.split(".")[0] not in OPTIONAL]
    assert not found, found


def test_reference_defaults_equal_the_stream_config():
    import pytest

    pytest.importorskip("torch")
    from convert.pytorch_reference import DEFAULTS

    from mlx_specstream.streams import StreamConfig

    assert DEFAULTS == StreamConfig().to_dict()


def test_trainer_takes_the_stream_shape_from_the_stream_config():
    from mlx_specstream.streams import StreamConfig
    from mlx_specstream.trainer import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not names & ({f.name for f in dataclasses.fields(StreamConfig)} - {"mode"})
    assert TrainConfig().streams == StreamConfig()


def test_each_default_declared_once():
    """Shared defaults are constants declared in one module; signatures use the constant."""
    import re

    src = {name: p.read_text() for name, p, _ in _modules()}
    for const, where in (
        ("DEFAULT_PREFILL_STEP", "mlx_specstream.cache"),
        ("DEFAULT_TREE_BUDGET", "mlx_specstream.tree"),
        ("DEFAULT_MAX_TOKENS", "mlx_specstream.decode"),
        ("DEFAULT_NUM_DRAFT", "mlx_specstream.drafters.draft_model"),
        ("DEFAULT_Q_BITS", "mlx_specstream.checkpoint"),
        ("DEFAULT_Q_GROUP_SIZE", "mlx_specstream.checkpoint"),
        ("DEFAULT_KV_GROUP_SIZE", "mlx_specstream.cache"),
        ("DEFAULT_SEGMENT", "mlx_specstream.streams.loss"),
        ("DEFAULT_ALPHA", "mlx_specstream.streams.loss"),
        ("SEED_STRIDE", "mlx_specstream.sample"),
    ):
        assert [n for n, s in src.items() if re.search(rf"^{const} = ", s, re.M)] == [where], const
    # a default a signature, a config field or a call spells as a number instead of the constant
    literal = re.compile(
        r"\b(prefill_step_size|tree_budget|num_draft|q_bits|q_group_size|segment|alpha|kv_group_size)"
        r"\s*(:\s*\w+)?\s*=\s*\d"
    )
    assert not [(n, m.group(0)) for n, s in src.items() for m in literal.finditer(s)]
    # a CLI flag sharing one of those defaults takes the constant (or the config's field) too
    flag = re.compile(
        r"\"--(q-bits|q-group-size|segment|alpha|kv-group-size|num-draft|prefill-step-size)\"[^)]*default=\d"
    )
    assert not [(n, m.group(0)) for n, s in src.items() for m in flag.finditer(s)]
    # the seed mixer: one function (``sample.derived_seed``)
    assert [n for n, s in src.items() if "1_000_003" in s] == ["mlx_specstream.sample"]
