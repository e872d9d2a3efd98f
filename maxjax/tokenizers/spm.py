"""``SentencePieceTokenizer``: a tokenizer backed by a SentencePiece ``.model`` file."""

from __future__ import annotations

import os
from typing import Any

import sentencepiece as spm

from .base import BaseTokenizer


class SentencePieceTokenizer(BaseTokenizer):
    """A ``PipelineTokenizer`` over ``sentencepiece``.

    ``add_bos`` (default: when the model defines a BOS piece) prepends BOS when
    ``add_special_tokens`` is asked for. ``eos_token_ids`` defaults to the model's EOS.
    """

    def __init__(self, model_path: str | os.PathLike, *, max_length: int, chat_template: str | None = None,
                 add_bos: bool | None = None, eos_token_ids: list[int] | None = None) -> None:
        self.model_path = os.fspath(model_path)
        self.processor = spm.SentencePieceProcessor(model_file=self.model_path)
        sp = self.processor
        bos = sp.bos_id() if sp.bos_id() >= 0 else None
        eos_ids = eos_token_ids or ([sp.eos_id()] if sp.eos_id() >= 0 else [])
        if not eos_ids:
            raise ValueError("the SentencePiece model has no eos piece: pass eos_token_ids")
        super().__init__(max_length=max_length, eos_token_ids=eos_ids, bos_token_id=bos, chat_template=chat_template,
                         special_tokens={"bos_token": None if bos is None else sp.id_to_piece(bos),
                                         "eos_token": sp.id_to_piece(eos_ids[0])})
        self.add_bos = (bos is not None) if add_bos is None else bool(add_bos and bos is not None)
        self._special_ids = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.processor.encode(text)
        if add_special_tokens and self.add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        if skip_special_tokens:
            return self.processor.decode([i for i in ids if i not in self._special_ids])
        # sentencepiece drops control pieces when decoding; keep their text between runs.
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                pieces.append(self.processor.decode(run) if run else "")
                pieces.append(self.processor.id_to_piece(i))
                run = []
            else:
                run.append(i)
        pieces.append(self.processor.decode(run) if run else "")
        return "".join(pieces)

    def token_to_piece(self, token_id: int) -> Any:
        return self.processor.id_to_piece(token_id)
