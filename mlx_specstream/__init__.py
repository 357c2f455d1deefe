"""mlx-specstream: Speculative Streaming for MLX."""

__version__ = "0.1.0"

from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .utils import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "__version__"]
