"""Structured output with llguidance: JSON schema -> grammar -> per-step token bitmask.

llguidance was chosen over xgrammar and outlines-core (measured, see the project notes): one small wheel
without torch, a numpy int32 bitmask in exactly the sampler's layout (bit ``j`` of word ``i`` allows token
``32 i + j``), matcher construction under a millisecond, correct handling of bounded schemas, and an
explicit error state instead of exceptions (so every schema is validated up front).

The grammar compiler holds one ``LLTokenizer`` per pipeline (building it from tokenizer.json takes ~0.3 s)
with the model's vocabulary size (the embedding rows, which may exceed the tokenizer's) and the real eos
id. Flexible whitespace is off: small models otherwise fill the output with spaces and newlines.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

_JSON_DEFAULTS = {"whitespace_flexible": False}


def _grammar(schema: Any) -> str:
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"response_format json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"response_format json_schema must be a JSON object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=dict(_JSON_DEFAULTS))
    except (ValueError, TypeError) as e:
        raise ValueError(f"response_format json_schema is invalid: {e}") from None


def check_json_schema(schema: Any) -> None:
    """Raises ValueError (naming ``response_format``) when llguidance cannot compile ``schema``."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(_grammar(schema))
    if error and not error.startswith("WARNING"):
        raise ValueError(f"response_format json_schema is invalid: {error}")


class GrammarCompiler:
    """Builds llguidance matchers for one model's tokenizer.

    Args:
        tokenizer_json: the HF tokenizer.json text of the model's tokenizer.
        vocab_size: the model's vocabulary size (logit width).
        eos_token_id: the id that ends a finished JSON document.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_id: int) -> None:
        import llguidance

        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_id)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int) -> "GrammarCompiler":
        """A compiler for a maxjax tokenizer backed by HF ``tokenizers`` (HFTokenizer)."""
        backend = getattr(tokenizer, "tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise ValueError(f"structured output needs a tokenizer backed by HF tokenizers (tokenizer.json); "
                             f"{type(tokenizer).__name__} is not")
        return cls(backend.to_str(), vocab_size, tokenizer.eos)

    def matcher(self, schema: Any) -> Any:
        """A fresh ``llguidance.LLMatcher`` for ``schema``; ValueError when the schema is invalid."""
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, _grammar(schema), log_level=0)
        if matcher.is_error():
            raise ValueError(f"response_format json_schema is invalid: {matcher.get_error()}")
        return matcher


def fill_bitmask(matcher: Any, bitmask: np.ndarray, row: int) -> None:
    """Writes the matcher's allowed next tokens into ``bitmask[row]`` (uint32 ``[B, ceil(V / 32)]``)."""
    import llguidance.numpy

    llguidance.numpy.fill_next_token_bitmask(matcher, bitmask.view(np.int32), row)


def matcher_finished(matcher: Any) -> bool:
    """True when the grammar is complete and accepts nothing but eos (the row can end)."""
    return bool(matcher.is_stopped())
