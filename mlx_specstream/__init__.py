"""mlx-specstream: Speculative Streaming for MLX."""

__version__ = "0.1.0"

from .generate import generate, stream_generate  # noqa: E402
from .loading import load  # noqa: E402
from .responses import GenerationResponse  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse", "__version__"]
