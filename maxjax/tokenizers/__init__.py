"""Tokenizers implementing ``PipelineTokenizer``: HF ``tokenizers`` (tokenizer.json or GGUF) and SentencePiece.

``load_tokenizer(path)`` picks the right one for a model folder or a GGUF file.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import JSON_OBJECT_SCHEMA, BaseTokenizer, json_schema_of, merge_stop
from .chat import normalize_messages, render_chat
from .hf import HFTokenizer
from .spm import SentencePieceTokenizer
from .stream import StreamDecoder


def load_tokenizer(path: str | os.PathLike, max_length: int | None = None) -> BaseTokenizer:
    """The tokenizer of a model folder or a ``.gguf`` file."""
    p = Path(path)
    if p.suffix == ".gguf":
        return HFTokenizer.from_gguf(p, max_length=max_length)
    return HFTokenizer.from_dir(p, max_length=max_length)


__all__ = [
    "JSON_OBJECT_SCHEMA",
    "BaseTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "json_schema_of",
    "load_tokenizer",
    "merge_stop",
    "normalize_messages",
    "render_chat",
]
