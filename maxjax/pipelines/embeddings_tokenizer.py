"""The tokenizer side of the embeddings pipeline: text -> ``[CLS] word pieces [SEP]`` -> TextContext.

A generation tokenizer rejects prompts that leave no room for new tokens and rejects empty prompts; an
embedding model does neither. It truncates long inputs to its ``max_length`` word pieces keeping the
final [SEP] (as sentence-transformers does) and embeds ``""`` as ``[CLS] [SEP]``. The settings embedded
in a tokenizer.json (truncation at 128, fixed padding) are switched off so only ``max_length`` applies.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import numpy as np

from maxjax.context import TextContext
from maxjax.interfaces import TextGenerationRequest
from maxjax.tokenizers import HFTokenizer
from maxjax.tokenizers.checks import check_text, refuse_adapter


def truncate_tokens(tokens: np.ndarray, max_length: int) -> np.ndarray:
    """Keep the first ``max_length - 1`` tokens and the final one ([SEP]), as HF 'longest_first' truncation
    of a single ``[CLS] text [SEP]`` sequence does."""
    if tokens.shape[0] <= max_length:
        return tokens
    return np.concatenate([tokens[: max_length - 1], tokens[-1:]])


class EmbeddingsTokenizer:
    """``PipelineTokenizer`` for sentence embeddings over an ``HFTokenizer`` (special tokens added)."""

    def __init__(self, tokenizer: HFTokenizer, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.hf = tokenizer
        self.max_length = int(max_length)
        self.hf.tokenizer.no_truncation()  # tokenizer.json may carry its own (shorter) truncation and padding
        self.hf.tokenizer.no_padding()

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, max_length: int) -> "EmbeddingsTokenizer":
        """Load a BERT tokenizer.json; [SEP] stands in for the end-of-sequence token it does not name."""
        from tokenizers import Tokenizer

        sep_id = Tokenizer.from_file(os.fspath(tokenizer_json)).token_to_id("[SEP]")
        if sep_id is None:
            raise ValueError(f"{tokenizer_json}: the vocabulary has no [SEP] token")
        return cls(HFTokenizer.from_file(tokenizer_json, max_length=max(max_length, 2), eos_token_ids=[sep_id]),
                   max_length)

    @property
    def vocab_size(self) -> int:
        return self.hf.vocab_size

    @property
    def eos(self) -> int:
        return self.hf.eos

    @property
    def expects_content_wrapping(self) -> bool:
        return False

    def encode_text(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Word-piece ids (int32) of ``text``, with [CLS]/[SEP] by default, truncated to ``max_length``."""
        check_text("text", text)
        ids = np.asarray(self.hf.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int32)
        return truncate_tokens(ids, self.max_length) if add_special_tokens else ids[: self.max_length]

    def decode_tokens(self, encoded: Any, skip_special_tokens: bool = False) -> str:
        return self.hf.decode_tokens(encoded, skip_special_tokens=skip_special_tokens)

    async def encode(self, prompt: str, add_special_tokens: bool = True) -> np.ndarray:
        return self.encode_text(prompt, add_special_tokens=add_special_tokens)

    async def decode(self, encoded: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return self.decode_tokens(encoded, skip_special_tokens=skip_special_tokens)

    async def new_context(self, request: TextGenerationRequest) -> TextContext:
        return self.build_context(request)

    def build_context(self, request: TextGenerationRequest) -> TextContext:
        """A TextContext whose prompt tokens are the input's word pieces (``prompt`` text or token ids)."""
        if not isinstance(request, TextGenerationRequest):
            raise ValueError(f"request must be a TextGenerationRequest, got {type(request).__name__}")
        refuse_adapter("lora_name", request.lora_name)
        if request.messages is not None:
            raise ValueError("messages are not supported for embeddings: send the text as prompt")
        if request.prompt is None:
            raise ValueError("prompt is required: the text to embed")
        if isinstance(request.prompt, str):
            ids = self.encode_text(request.prompt)
        else:
            ids = self._check_ids(request.prompt)
        # Nothing is generated: max_length only has to exceed the prompt.
        return TextContext(request.request_id, ids, max_length=ids.size + 1, eos_token_ids={self.eos})

    def _check_ids(self, prompt: Any) -> np.ndarray:
        values = prompt.reshape(-1).tolist() if isinstance(prompt, np.ndarray) else list(prompt)
        if not values:
            raise ValueError("prompt token ids are empty")
        bad = [t for t in values if isinstance(t, bool) or not isinstance(t, numbers.Integral)
               or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size}), got {bad[:5]}")
        return truncate_tokens(np.asarray(values, dtype=np.int32), self.max_length)
