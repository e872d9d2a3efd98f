"""Chat templates: render messages to a prompt string in a sandbox.

A chat template is untrusted input (it ships with a model file), so it runs in jinja2's
``ImmutableSandboxedEnvironment`` with the helpers HF templates expect
(``raise_exception``, ``tojson``, ``strftime_now``) and nothing else.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_IMAGE_PART_TYPES = {"image", "image_url", "input_image"}
_TEXT_PART_TYPES = {"text", "input_text"}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a template once; a syntax error becomes a ValueError naming ``chat_template``."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not a valid jinja template: {e}") from e


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and flatten list-of-parts content to a string (text-only models).

    Text parts may spell their text as ``text`` (OpenAI) or ``content``; image parts raise.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, (list, tuple)):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in _IMAGE_PART_TYPES:
                    raise ValueError(f"messages[{i}].content[{j}]: images are not supported: this model is text-only")
                if kind not in _TEXT_PART_TYPES:
                    raise ValueError(f"messages[{i}].content[{j}]: unsupported content part {part!r}")
                text = part.get("text", part.get("content"))
                if not isinstance(text, str):
                    raise ValueError(f"messages[{i}].content[{j}]: a text part needs a string 'text'")
                texts.append(text)
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        out.append({**message, "content": content})
    return out


def render_chat(template: str | None, messages: Any, *, tools: list | None = None, add_generation_prompt: bool = True,
                special_tokens: dict[str, str | None] | None = None, options: dict[str, Any] | None = None) -> str:
    """Render ``messages`` (and ``tools``) with ``template``; ``options`` are extra template variables."""
    if not template:
        raise ValueError("messages need a chat template, and this model has none: send a plain prompt instead")
    variables: dict[str, Any] = dict(special_tokens or {})
    variables.update(messages=normalize_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt)
    if options:
        if not isinstance(options, dict):
            raise ValueError(f"chat_template_options must be a dict, got {type(options).__name__}")
        variables.update(options)
    try:
        return compile_chat_template(template).render(**variables)
    except jinja2.exceptions.TemplateError as e:  # raise_exception(), sandbox violations, undefined calls
        raise ValueError(f"chat template failed on messages: {e}") from e
