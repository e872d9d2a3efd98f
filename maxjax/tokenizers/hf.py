"""``HFTokenizer``: a tokenizer backed by HF ``tokenizers`` (tokenizer.json or a GGUF vocabulary)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .base import BaseTokenizer
from .gguf_vocab import read_gguf_tokenizer

_HUGE = 10**9  # HF writes model_max_length = 1e30 when it does not know


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (use 'default')."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


class HFTokenizer(BaseTokenizer):
    """A ``PipelineTokenizer`` over a ``tokenizers.Tokenizer``.

    Build it with ``from_file`` (tokenizer.json), ``from_dir`` (a model folder) or
    ``from_gguf`` (the vocabulary embedded in a GGUF file); ``save`` writes a folder that
    ``from_dir`` restores.
    """

    def __init__(self, tokenizer: Tokenizer, *, max_length: int, eos_token_ids: list[int],
                 bos_token_id: int | None = None, add_bos_token: bool = False, chat_template: str | None = None,
                 pad_token_id: int | None = None) -> None:
        def text(i: int | None) -> str | None:
            return None if i is None else tokenizer.id_to_token(i)

        super().__init__(max_length=max_length, eos_token_ids=eos_token_ids, bos_token_id=bos_token_id,
                         chat_template=chat_template,
                         special_tokens={"bos_token": text(bos_token_id), "eos_token": text(eos_token_ids[0])})
        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self.pad_token_id = pad_token_id
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- constructors ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, tokenizer_config_json: str | os.PathLike | None = None,
                  max_length: int | None = None, eos_token_ids: list[int] | None = None) -> "HFTokenizer":
        """Load tokenizer.json, with bos/eos/chat template from tokenizer_config.json when given."""
        try:
            tk = Tokenizer.from_file(os.fspath(tokenizer_json))
        except Exception as error:  # the tokenizers library raises its own exception type
            raise ValueError(f"{tokenizer_json}: not a valid tokenizer.json ({error})") from error
        config = _read_json(Path(tokenizer_config_json)) if tokenizer_config_json else {}

        def token_id(key: str) -> int | None:
            name = _token_text(config.get(key))
            return None if name is None else tk.token_to_id(name)

        eos_ids = list(eos_token_ids or config.get("eos_token_ids") or [])
        end_id = token_id("eos_token") if token_id("eos_token") is not None else token_id("sep_token")  # BERT: [SEP]
        if not eos_ids and end_id is not None:
            eos_ids = [end_id]
        if not eos_ids:
            raise ValueError("no eos token: tokenizer_config.json names no eos_token; pass eos_token_ids")
        if max_length is None:
            model_max = config.get("model_max_length")
            if not isinstance(model_max, (int, float)) or model_max >= _HUGE:
                raise ValueError("max_length is unknown: tokenizer_config.json has no usable model_max_length")
            max_length = int(model_max)
        return cls(tk, max_length=max_length, eos_token_ids=eos_ids, bos_token_id=token_id("bos_token"),
                   add_bos_token=bool(config.get("add_bos_token", False)),
                   chat_template=_pick_template(config.get("chat_template")), pad_token_id=token_id("pad_token"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike, max_length: int | None = None) -> BaseTokenizer:
        """Load a model folder: tokenizer.json (+ tokenizer_config.json, chat_template.jinja,
        config.json, generation_config.json), or tokenizer.model (SentencePiece) when there is
        no tokenizer.json."""
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        if max_length is None:
            candidates = [model_config.get("max_position_embeddings"), config.get("model_max_length")]
            max_length = next((int(c) for c in candidates if isinstance(c, (int, float)) and c < _HUGE), None)
        if max_length is None:
            raise ValueError(f"max_length is unknown for {folder}: pass max_length")
        template = _pick_template(config.get("chat_template"))
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos = _read_json(folder / "generation_config.json").get("eos_token_id", model_config.get("eos_token_id"))
        extra_eos = [eos] if isinstance(eos, int) else list(eos or [])

        if not (folder / "tokenizer.json").is_file():
            if (folder / "tokenizer.model").is_file():
                from .spm import SentencePieceTokenizer

                return SentencePieceTokenizer(folder / "tokenizer.model", max_length=max_length,
                                              chat_template=template, add_bos=config.get("add_bos_token"))
            raise ValueError(f"{folder} has neither tokenizer.json nor tokenizer.model")
        tokenizer = cls.from_file(folder / "tokenizer.json", max_length=max_length,
                                  eos_token_ids=config.get("eos_token_ids") or None,
                                  **({"tokenizer_config_json": folder / "tokenizer_config.json"} if config else {}))
        tokenizer.eos_token_ids = tuple(dict.fromkeys([*tokenizer.eos_token_ids, *map(int, extra_eos)]))
        tokenizer.chat_template = template
        return tokenizer

    @classmethod
    def from_gguf(cls, source: Any, max_length: int | None = None) -> "HFTokenizer":
        """Build the tokenizer embedded in a GGUF file (path or ``gguf.GGUFReader``)."""
        spec = read_gguf_tokenizer(source)
        if not spec.eos_token_ids:
            raise ValueError("the GGUF file names no eos token (tokenizer.ggml.eos_token_id)")
        max_length = max_length or spec.context_length
        if max_length is None:
            raise ValueError("the GGUF file has no context_length: pass max_length")
        return cls(spec.tokenizer, max_length=max_length, eos_token_ids=spec.eos_token_ids,
                   bos_token_id=spec.bos_token_id, add_bos_token=spec.add_bos_token, chat_template=spec.chat_template)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``path`` (restored by ``from_dir``)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))

        def text(i: int | None) -> str | None:
            return None if i is None else self.tokenizer.id_to_token(i)

        config = {"bos_token": text(self.bos_token_id), "eos_token": text(self.eos), "pad_token": text(self.pad_token_id),
                  "eos_token_ids": list(self.eos_token_ids), "add_bos_token": self.add_bos_token,
                  "model_max_length": self.max_length, "chat_template": self.chat_template}
        with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
