"""The one user-error type. Bad input — a checkpoint, data file, request or option that is
wrong — raises :class:`UserError` (or a subclass), which the CLI prints as one line and the server
answers with a 400. Anything else is a bug: a traceback on the CLI, a 500 with a request id in the
server's log. (MLX raises ``ValueError`` for its own shape errors: never catch that wholesale.)"""


class UserError(ValueError):
    """Bad input, named. A ``ValueError`` so callers that guarded against bad input keep working."""
