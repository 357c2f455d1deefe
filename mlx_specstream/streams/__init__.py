"""Speculative Streaming's own parts: config (:mod:`.config`), parameters (:mod:`.params`), the
multi-stream-attention forward (:mod:`.msa`), stream files (:mod:`.files`), training loss
(:mod:`.loss`). The decode step that uses them is :class:`mlx_specstream.drafters.StreamDrafter`."""

from .config import StreamConfig
from .files import STREAMS_CONFIG, find_stream_file, load_streams, read_stream_config, save_streams, shipped_stream_file
from .msa import bottom_forward, early_exit_logits, forward_with_streams, main_forward, msa_forward, msa_mask
from .params import SpeculativeStreams

__all__ = [
    "StreamConfig",
    "SpeculativeStreams",
    "STREAMS_CONFIG",
    "find_stream_file",
    "load_streams",
    "read_stream_config",
    "save_streams",
    "shipped_stream_file",
    "bottom_forward",
    "early_exit_logits",
    "forward_with_streams",
    "main_forward",
    "msa_forward",
    "msa_mask",
]
