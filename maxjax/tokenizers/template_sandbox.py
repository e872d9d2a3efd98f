"""A jinja2 sandbox that bounds what rendering an untrusted chat template may cost.

jinja2's ``ImmutableSandboxedEnvironment`` stops a template from reaching Python internals, but not from
spending time or memory: nested ``range`` loops, ``lipsum(n=10**6)``, ``'x' * 10**10`` or ``9 ** 9 ** 9``
would hang or abort the serving process. ``BoundedSandbox`` adds, on top of jinja's own ``MAX_RANGE``:

* sizes: every string, list or number a template builds (operators ``* ** + %``, ``~`` joins, ``{% set %}``
  blocks, filters, method calls) is checked against ``MAX_CHARS`` before it is built where its size can be
  predicted from the operands, and after otherwise; integer arguments (widths, counts) are capped likewise;
* time: ``render_bounded`` traces the template's own frames and stops the render after ``MAX_SECONDS``;
* output: the rendered text is streamed and stops at ``MAX_CHARS``.

A template over a limit raises ``TemplateLimitError``; nothing else in the process is affected.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from typing import Any

import jinja2
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum

MAX_CHARS = 1 << 22
"""Largest string or collection a template may build, and its largest output (4 Mi characters: more text
than any context window holds)."""
MAX_SECONDS = 2.0
"""Render time limit; real chat templates render in milliseconds."""
MAX_INT_BITS = 4096
"""Largest integer a template may compute (bits)."""
MAX_LIPSUM_WORDS = 1000
_TEMPLATE_FILENAME = "<template>"  # jinja's code filename for templates built with from_string
_NUMBER = re.compile(r"\d+")


class TemplateLimitError(jinja2.exceptions.SecurityError):
    """A chat template went over a size or time limit of ``BoundedSandbox``."""


def _size(value: Any, depth: int = 0) -> int:
    """How much a value weighs against ``MAX_CHARS``: characters of strings, digits of integers, and
    for containers their length plus their items' weights (what printing them would write)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return 1
    if isinstance(value, int):
        return value.bit_length() // 3 + 1  # about its decimal digits
    if isinstance(value, range):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if depth > 64:
            return MAX_CHARS + 1
        total = len(value)
        for item in (value.items() if isinstance(value, dict) else value):
            total += _size(item, depth + 1)
            if total > MAX_CHARS:
                break
        return total
    return 1


def _limit(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise TemplateLimitError(f"chat template {what} would be {size} elements long; the limit is {MAX_CHARS}")


def _limit_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"chat template integer would have {bits} bits; the limit is {MAX_INT_BITS}")


def _bounded(value: Any, what: str) -> Any:
    _limit(_size(value), what)
    return value


def _check_ints(args: tuple, kwargs: dict, what: str) -> None:
    """Integer arguments are widths and counts: none may exceed the size limit."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
            raise TemplateLimitError(f"chat template {what}: argument {value} exceeds the limit {MAX_CHARS}")


def _check_format(fmt: Any, what: str) -> None:
    """Widths written inside a format string ("%0999999999d", "{:>999999999}") are sizes too."""
    if isinstance(fmt, str) and any(int(n) > MAX_CHARS for n in _NUMBER.findall(fmt)):
        raise TemplateLimitError(f"chat template {what}: a format width exceeds the limit {MAX_CHARS}")


def _predict(name: str, target: Any, args: tuple, kwargs: dict) -> None:
    """Sizes of the string operations that can multiply their input, checked before they run."""
    if not isinstance(target, str):
        if name == "join" and args and isinstance(args[0], str):  # the join filter: target is the sequence
            target, args = args[0], (target, *args[1:])
        else:
            return
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = len(target) + 1 if not args[0] else target.count(args[0])
        _limit(len(target) + hits * len(args[1]), name)
    elif name == "join" and args:
        try:
            parts = list(args[0])
        except TypeError:
            return
        _limit(sum(_size(p) for p in parts) + len(target) * len(parts), name)
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _limit(len(target) + target.count("\t") * tab, name)
    elif name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 1
        _limit(len(target) + (target.count("\n") + 1) * pad, name)
    elif name in ("format", "format_map"):
        _check_format(target, name)


def _bounded_filter(name: str, func: Any) -> Any:
    @functools.wraps(func)  # keeps jinja's pass_context / pass_environment markers
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_ints(args, kwargs, f"filter {name}")
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                       jinja2.nodes.EvalContext))]
        if values:
            _predict(name, values[0], tuple(values[1:]), kwargs)
        return _bounded(func(*args, **kwargs), f"filter {name}")

    return wrapper


def _bounded_join(join: Any) -> Any:
    def wrapper(seq: Any) -> Any:
        parts = list(seq)
        _limit(sum(_size(p) for p in parts), "string")
        return join(parts)

    return wrapper


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if any(isinstance(v, int) and v > MAX_LIPSUM_WORDS for v in (n, min, max)):
        raise TemplateLimitError(f"chat template lipsum: at most {MAX_LIPSUM_WORDS} paragraphs/words")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` whose operators, calls, filters and joins are size-checked."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    concat = staticmethod(_bounded_join("".join))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["lipsum"] = _lipsum

    def bound_filters(self) -> None:
        """Wrap every registered filter (call after adding the environment's own filters)."""
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            if isinstance(right, int) and not isinstance(left, (int, float)):
                _limit(_size(left) * max(right, 0), "repetition")
            elif isinstance(left, int) and not isinstance(right, (int, float)):
                _limit(_size(right) * max(left, 0), "repetition")
            elif isinstance(left, int) and isinstance(right, int):
                _limit_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _limit_bits(max(left.bit_length() - 1, 0) * right)
        elif operator == "+" and not isinstance(left, (int, float)):
            _limit(_size(left) + _size(right), "concatenation")
        elif operator == "%":
            _check_format(left, "format")
        return _bounded(super().call_binop(context, operator, left, right), f"operator {operator}")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's names)
        name = getattr(__obj, "__name__", "")
        _check_ints(args, kwargs, f"call {name}")
        target = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        _predict(name, target, args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs), f"call {name}")


def compile_bounded(env: BoundedSandbox, source: str) -> jinja2.Template:
    """``env.from_string`` with the template's ``~`` joins size-checked too."""
    template = env.from_string(source)
    namespace = template.root_render_func.__globals__  # the compiled template module's globals
    namespace["str_join"] = _bounded_join(str_join)
    namespace["markup_join"] = _bounded_join(markup_join)
    return template


def render_bounded(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """Render within ``MAX_SECONDS`` and ``MAX_CHARS`` of output, or raise ``TemplateLimitError``."""
    deadline = time.monotonic() + MAX_SECONDS

    def trace_template_lines(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"chat template took longer than {MAX_SECONDS} s to render")
        return trace_template_lines

    def trace_calls(frame: Any, event: str, arg: Any) -> Any:
        return trace_template_lines if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(trace_calls)
    try:
        pieces, length = [], 0
        for piece in template.generate(variables):
            length += len(piece)
            _limit(length, "output")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(pieces)
