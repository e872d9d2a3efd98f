"""Chat templates: render messages to a prompt string in a sandbox.

A chat template is untrusted input (it ships with a model file), so it runs in a jinja2 sandbox bounded
in time and size (``template_sandbox.BoundedSandbox``) with the helpers HF templates expect
(``raise_exception``, ``tojson``, ``strftime_now``) and nothing else. Messages, their roles and the
request's ``chat_template_options`` are checked before rendering: an unknown role or an option that
would replace ``messages`` could otherwise inject text into the prompt.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext

from .checks import check_text
from .template_sandbox import BoundedSandbox, compile_bounded, render_bounded

_IMAGE_PART_TYPES = {"image", "image_url", "input_image"}
_TEXT_PART_TYPES = {"text", "input_text"}
ROLES = ("system", "user", "assistant", "tool")
"""Chat roles a request may use: the protocol's system/user/assistant, and tool results."""
_TEMPLATE_VARIABLES = {"messages", "tools", "add_generation_prompt", "self"}
_MAX_OPTION_DEPTH = 32


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
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.bound_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return compile_bounded(env, template)
    except Exception as e:  # syntax errors, and errors jinja's constant folding raises while compiling
        raise ValueError(f"chat_template is not a valid jinja template: {type(e).__name__}: {e}") from e


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
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message['role']!r}")
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
                texts.append(check_text(f"messages[{i}].content[{j}].text", text))
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        else:
            check_text(f"messages[{i}].content", content)
        out.append({**message, "content": content})
    return out


def check_template_options(options: Any, reserved: set[str]) -> dict[str, Any]:
    """``chat_template_options``: a dict of extra template variables whose names are identifiers that
    replace none of the ``reserved`` ones (messages, tools, special tokens, template globals) and whose
    values are JSON-like data."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"chat_template_options must be a dict, got {type(options).__name__}")
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"chat_template_options keys must be identifier strings, got {key!r}")
        if key in reserved:
            raise ValueError(f"chat_template_options[{key!r}] is reserved: it would replace the template's own "
                             f"{key!r}")
        _check_option_value(f"chat_template_options[{key!r}]", value, 0)
    return options


def _check_option_value(path: str, value: Any, depth: int) -> None:
    if depth > _MAX_OPTION_DEPTH:
        raise ValueError(f"{path}: nested deeper than {_MAX_OPTION_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float)):
        return
    if isinstance(value, str):
        check_text(path, value)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_option_value(f"{path}[{i}]", item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: keys must be strings, got {key!r}")
            _check_option_value(f"{path}[{key!r}]", item, depth + 1)
    else:
        raise ValueError(f"{path} must be JSON-like data (str, number, bool, None, list, dict), got "
                         f"{type(value).__name__}")


def render_chat(template: str | None, messages: Any, *, tools: list | None = None, add_generation_prompt: bool = True,
                special_tokens: dict[str, str | None] | None = None, options: dict[str, Any] | None = None) -> str:
    """Render ``messages`` (and ``tools``) with ``template``; ``options`` are extra template variables."""
    if not template:
        raise ValueError("messages need a chat template, and this model has none: send a plain prompt instead")
    compiled = compile_chat_template(template)
    variables: dict[str, Any] = dict(special_tokens or {})
    reserved = _TEMPLATE_VARIABLES | set(variables) | set(compiled.environment.globals)
    variables.update(check_template_options(options, reserved))
    variables.update(messages=normalize_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt)
    try:
        return render_bounded(compiled, variables)
    except Exception as e:  # untrusted template code: raise_exception(), sandbox and size limits, its own bugs
        raise ValueError(f"chat template failed on messages: {type(e).__name__}: {e}") from e
