"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` in vLLM's shape, so that clients which tokenize through
the server (lm-eval's ``local-completions`` with its remote tokenizer, prompt-length checks) need no local copy
of the model's tokenizer. A request names a text model with ``model``; without one, the first text model served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from maxjax.server.models import ServedModel
from maxjax.server.openai_protocol import ChatMessage, InvalidRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


class TokenizeRequest(_Body):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


def add_tokenizer_routes(app: FastAPI, text_model: Callable[[str | None], ServedModel]) -> None:
    """``text_model(name)``: the served text model (None: the first one), as the app looks models up."""
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        served = text_model(body.model)
        tokenizer = served.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("prompt", "give either prompt or messages")
        try:
            if body.messages is not None:
                text = tokenizer.apply_chat_template([m.for_template() for m in body.messages],
                                                     add_generation_prompt=body.add_generation_prompt)
                tokens = tokenizer.token_ids(text, add_special_tokens=False)
            else:
                tokens = tokenizer.token_ids(body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as error:
            raise InvalidRequest("messages" if body.messages is not None else "prompt", str(error)) from None
        strs = [tokenizer.decode_tokens([t]) for t in tokens] if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": _max_len(served), "tokens": tokens, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        served = text_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < served.tokenizer.vocab_size]
        if bad:
            raise InvalidRequest("tokens", f"token ids must be in [0, {served.tokenizer.vocab_size}), got {bad[:5]}")
        return {"prompt": served.tokenizer.decode_tokens(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict[str, Any]:
        served = text_model(model)
        tokenizer = served.tokenizer
        special = getattr(tokenizer, "special_tokens", {})
        pad = getattr(tokenizer, "pad_token_id", None)
        return {"tokenizer_class": type(tokenizer).__name__, "model": served.name,
                "eos_token": special.get("eos_token"), "bos_token": special.get("bos_token"),
                "pad_token": None if pad is None else tokenizer.decode_tokens([pad]),
                "chat_template": tokenizer.chat_template, "model_max_length": _max_len(served),
                "vocab_size": tokenizer.vocab_size}


def _max_len(served: ServedModel) -> int:
    return min(served.tokenizer.max_length, served.pipeline.config.max_seq_len)
