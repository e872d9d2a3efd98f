"""Behaviour shared by every maxjax tokenizer: request validation, chat rendering, contexts.

Every async method of the ``PipelineTokenizer`` protocol is a thin wrapper over a
synchronous one (``encode_text``, ``decode_tokens``, ``build_context``), so code that
already runs inside an event loop (a notebook) can call the synchronous ones directly.
A subclass provides only ``_encode``, ``_decode``, ``vocab_size`` and the special tokens.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from maxjax.context import TextContext, check_lora_name
from maxjax.interfaces import TextGenerationRequest

from .chat import render_chat
from .checks import check_text
from .stream import StreamDecoder

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
"""The schema used for ``response_format={"type": "json_object"}``: any JSON object."""


class BaseTokenizer:
    """A ``PipelineTokenizer`` over an encode/decode backend.

    Attributes set by subclasses: ``max_length`` (the model's context length: prompts must
    be shorter), ``eos_token_ids`` (ids that end generation; ``eos`` is the first),
    ``bos_token_id``, ``chat_template`` and ``special_tokens`` (``bos_token``/``eos_token``
    strings for the template).
    """

    context_class: type[TextContext] = TextContext
    lora_adapters: Any = None  # the pipeline's resident LoRA adapters (`.names`), set by load_pipeline

    def __init__(self, *, max_length: int, eos_token_ids: Sequence[int], bos_token_id: int | None = None,
                 chat_template: str | None = None, special_tokens: dict[str, str | None] | None = None) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if not eos_token_ids:
            raise ValueError("eos_token_ids must name at least one end-of-sequence token")
        self.max_length = int(max_length)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(t) for t in eos_token_ids))
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})

    # ---- backend hooks ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    # ---- PipelineTokenizer -----------------------------------------------------------------------

    @property
    def eos(self) -> int:
        return self.eos_token_ids[0]

    @property
    def expects_content_wrapping(self) -> bool:
        return False

    async def encode(self, prompt: str, add_special_tokens: bool = False) -> np.ndarray:
        return self.encode_text(prompt, add_special_tokens=add_special_tokens)

    async def decode(self, encoded: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return self.decode_tokens(encoded, skip_special_tokens=skip_special_tokens)

    async def new_context(self, request: Any) -> TextContext:
        return self.build_context(request)

    # ---- synchronous API -------------------------------------------------------------------------

    def encode_text(self, prompt: str, add_special_tokens: bool = False) -> np.ndarray:
        """Token ids (int32) of ``prompt``; ValueError when it does not fit ``max_length``."""
        check_text("prompt", prompt)
        ids = np.asarray(self._encode(prompt, add_special_tokens), dtype=np.int32)
        if ids.size >= self.max_length:
            raise ValueError(f"prompt is {ids.size} tokens; the model's maximum length is {self.max_length} "
                             "(prompt plus at least one new token)")
        return ids

    def token_ids(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of any text, however long (no prompt-length check): counting, scoring windows of a document."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return [int(t) for t in self._encode(text, add_special_tokens)]

    def decode_tokens(self, encoded: Any, skip_special_tokens: bool = False) -> str:
        ids = np.asarray(encoded).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"encoded must hold integer token ids, got dtype {ids.dtype}")
        return self._decode([int(t) for t in ids], skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder for tokens arriving one step at a time (see ``StreamDecoder``)."""
        return StreamDecoder(lambda ids: self._decode(ids, skip_special_tokens))

    def apply_chat_template(self, messages: Any, *, tools: list | None = None, add_generation_prompt: bool = True,
                            options: dict[str, Any] | None = None) -> str:
        """Render chat ``messages`` to the prompt text the model was trained on."""
        return render_chat(self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, options=options)

    def prompt_token_ids(self, request: TextGenerationRequest) -> np.ndarray:
        """The prompt of a request as token ids: a token list, a text prompt or rendered messages."""
        if request.images:
            raise ValueError("images are not supported: this model is text-only")
        if request.prompt is not None and request.messages is not None:
            raise ValueError("give either prompt or messages, not both")
        if request.prompt is None and request.messages is None:
            raise ValueError("the request has neither prompt nor messages")
        if request.messages is not None:
            text = self.apply_chat_template(request.messages, tools=request.tools,
                                            options=request.chat_template_options)
            return self.encode_text(text, add_special_tokens=False)  # the template writes any BOS itself
        if isinstance(request.prompt, str):
            if not request.prompt.strip():  # nothing to continue from, as an empty prompt
                raise ValueError("prompt is empty (or only whitespace)")
            return self.encode_text(request.prompt, add_special_tokens=True)
        return self.check_token_ids(request.prompt)

    def check_token_ids(self, prompt: Any) -> np.ndarray:
        """A token-id prompt as int32, checked: non-empty, ids in the vocabulary, shorter than max_length."""
        ids = list(prompt) if not isinstance(prompt, np.ndarray) else prompt.reshape(-1).tolist()
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)
               or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size}), got {bad[:5]}")
        if len(ids) >= self.max_length:
            raise ValueError(f"prompt is {len(ids)} tokens; the model's maximum length is {self.max_length}")
        return np.asarray(ids, dtype=np.int32)

    def build_context(self, request: Any) -> TextContext:
        """A TextContext for a request; subclasses extend this for other request types."""
        if not isinstance(request, TextGenerationRequest):
            raise ValueError(f"request must be a TextGenerationRequest, got {type(request).__name__}")
        prompt = self.prompt_token_ids(request)
        params = request.sampling_params
        if request.logprobs > self.vocab_size:
            raise ValueError(f"logprobs {request.logprobs} exceeds the vocabulary size {self.vocab_size}")
        if any(t >= self.vocab_size for t in params.stop_token_ids or ()):
            raise ValueError(f"sampling_params.stop_token_ids must be in [0, {self.vocab_size}), "
                             f"got {params.stop_token_ids}")
        max_length = self.max_length
        if params.max_new_tokens is not None:
            max_length = min(max_length, prompt.size + params.max_new_tokens)
        schema = json_schema_of(request.response_format)
        if schema is not None:
            from maxjax.pipelines.structured import check_json_schema  # llguidance, imported on first use

            check_json_schema(schema)
        return self.context_class(
            request.request_id, prompt, max_length=max_length, eos_token_ids=set(self.eos_token_ids),
            sampling_params=params, log_probabilities=request.logprobs, log_probabilities_echo=request.echo,
            json_schema=schema, stop=merge_stop(request.stop, params.stop),
            lora_name=check_lora_name(request.lora_name, loaded_lora_names(self)))


def loaded_lora_names(tokenizer: Any) -> list[str]:
    """The LoRA adapters a request may name through this tokenizer (none unless load_pipeline attached some)."""
    adapters = getattr(tokenizer, "lora_adapters", None)
    return [] if adapters is None else adapters.names


def merge_stop(*sources: str | list[str] | None) -> list[str]:
    """Stop strings from several sources, in order, without duplicates or empty strings."""
    out: list[str] = []
    for source in sources:
        for s in [source] if isinstance(source, str) else (source or []):
            if s and s not in out:
                out.append(s)
    return out


def json_schema_of(response_format: Any) -> Any:
    """The raw JSON schema a ``response_format`` asks for (None for free text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be a dict, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return dict(JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and "schema" in spec:  # OpenAI: {"name", "schema", ...}
            if not isinstance(spec["schema"], dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object, got "
                                 f"{type(spec['schema']).__name__}")
            return spec["schema"]
        if isinstance(spec, (dict, str)) and spec:
            return spec
        raise ValueError("response_format of type json_schema needs a 'json_schema' object")
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
