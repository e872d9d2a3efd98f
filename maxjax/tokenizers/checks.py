"""Checks tokenizers apply where request fields enter: text that can be encoded; no adapters where none exist."""

from __future__ import annotations


def check_text(field: str, text: object) -> str:
    """``text`` as a str that UTF-8 can encode (a lone surrogate cannot: the tokenizer would fail on it)."""
    if not isinstance(text, str):
        raise ValueError(f"{field} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{field} is not valid Unicode: {error.reason} {text[error.start:error.end]!r} at "
                         f"character {error.start}") from None
    return text


def refuse_adapter(field: str, name: object) -> None:
    """For pipelines without LoRA support (embeddings): a request naming an adapter fails rather than getting
    the base model."""
    if name is not None:
        raise ValueError(f"{field}={name!r}: this pipeline serves no LoRA adapters (leave {field} unset)")
