"""Bad input is a named one-line error; anything else — an MLX shape error included — is a bug:
a traceback and a line saying so."""

import pytest

from mlx_specstream import cli
from mlx_specstream.checkpoint import CheckpointError
from mlx_specstream.errors import UserError
from mlx_specstream.trainer import DataError


def test_every_bad_input_error_is_a_user_error():
    from mlx_specstream.gguf import GGUFError
    from mlx_specstream.models import UnsupportedModelError
    from mlx_specstream.torch_pickle import UnsafeCheckpointError

    for cls in (CheckpointError, DataError, GGUFError, UnsupportedModelError, UnsafeCheckpointError):
        assert issubclass(cls, UserError)


def test_bad_input_is_one_line(capsys):
    assert cli.main(["generate", "--model", "smollm2", "-m", "0", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: --max-tokens must be at least 1, got 0"


def test_an_mlx_error_is_a_bug_with_its_traceback(monkeypatch, capsys):
    import importlib

    gen = importlib.import_module("mlx_specstream.generate")  # the package exports a function of that name

    def shape_error(*_, **__):
        raise ValueError("[matmul] Last dimension of first input with shape (1,8) must match second (4,4)")

    monkeypatch.setattr(gen, "load_from_args", shape_error)
    assert cli.main(["generate", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "[matmul]" in err and "is a bug in mlx-specstream" in err
