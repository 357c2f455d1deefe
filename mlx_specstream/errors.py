"""The one user-error type. Bad input — a checkpoint, data file, request or option that is
wrong — raises :class:`UserError` (or a subclass), which the CLI prints as one line and the server
answers with a 400. Anything else is a bug: a traceback on the CLI, a 500 with a request id in the
server's log. (MLX raises ``ValueError`` for its own shape errors: never catch that wholesale.)"""

import warnings


class UserError(ValueError):
    """Bad input, named. A ``ValueError`` so callers that guarded against bad input keep working."""


class Notice(UserWarning):
    """Something a user should hear once — a slower path taken, a setting not used — issued with
    :func:`notice` through :mod:`warnings` (shown once per message, filterable like any warning);
    the CLI prints each as its one line (:func:`plain_notices`)."""


def notice(message: str) -> None:
    warnings.warn(message, Notice, stacklevel=2)


def plain_notices() -> None:
    """Print notices as their message alone (other warnings keep Python's format)."""
    original = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        return f"{message}\n" if issubclass(category, Notice) else original(message, category, filename, lineno, line)

    warnings.formatwarning = fmt
