"""Packing contexts into the engine's host row arrays, and checking them first.

Everything here is numpy: a context's request becomes one row of the bucket-padded arrays that the
compiled programs take. A check that fails names the request and the field, before any state changes.
"""

from __future__ import annotations

import numpy as np

from maxjax.context import TextContext
from maxjax.runtime.config import RuntimeConfig


def check_context(request_id: str, ctx: object, config: RuntimeConfig, vocab_size: int) -> None:
    """Raises ValueError (naming the request and field) for a context this runtime cannot serve."""
    if not isinstance(ctx, TextContext):
        raise ValueError(f"request {request_id!r}: batch values must be TextContext, got {type(ctx).__name__}")
    if ctx.request_id != request_id:
        raise ValueError(f"request {request_id!r}: the batch key differs from the context's request_id "
                         f"{ctx.request_id!r}")
    if ctx.max_length > config.max_seq_len:
        raise ValueError(f"request {request_id!r}: max_length {ctx.max_length} exceeds the runtime's max_seq_len "
                         f"{config.max_seq_len}")
    tokens = ctx.next_tokens  # every token reaches the model through this window once: check only it
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"request {request_id!r}: prompt token ids must be in [0, {vocab_size})")
    params = ctx.sampling_params
    try:
        params.__post_init__()  # again: a frozen dataclass can still be changed behind its back
    except ValueError as error:
        raise ValueError(f"request {request_id!r}: sampling_params: {error}") from None
    if len(ctx.stop_token_ids) > config.max_stop_ids:
        raise ValueError(f"request {request_id!r}: {len(ctx.stop_token_ids)} eos + stop_token_ids exceed the "
                         f"runtime's max_stop_ids ({config.max_stop_ids})")
    if any(not 0 <= t < vocab_size for t in ctx.stop_token_ids):
        raise ValueError(f"request {request_id!r}: sampling_params.stop_token_ids must be in [0, {vocab_size})")
    if ctx.log_probabilities > config.max_logprobs:
        raise ValueError(f"request {request_id!r}: logprobs {ctx.log_probabilities} exceeds the runtime's "
                         f"max_logprobs ({config.max_logprobs})")


def fill_sampling_row(arrays: dict[str, np.ndarray], row: int, ctx: TextContext) -> None:
    """Writes one context's sampling parameters into row ``row`` of the engine's sampling arrays."""
    p = ctx.sampling_params
    arrays["temperature"][row] = p.temperature
    arrays["top_k"][row] = p.top_k  # the sampler reads 0 as no top-k limit
    arrays["top_p"][row] = p.top_p
    arrays["min_p"][row] = p.min_p
    arrays["repetition_penalty"][row] = p.repetition_penalty
    arrays["frequency_penalty"][row] = p.frequency_penalty
    arrays["presence_penalty"][row] = p.presence_penalty
    arrays["seed"][row] = p.seed
    arrays["min_tokens"][row] = p.min_new_tokens
    stop_ids = sorted(ctx.stop_token_ids)
    arrays["stop_ids"][row] = -1
    arrays["stop_ids"][row, : len(stop_ids)] = stop_ids


def decode_budget(ctx: TextContext, num_steps: int) -> int:
    """How many tokens the context may still generate in a call of ``num_steps`` steps."""
    budget = min(num_steps, ctx.max_length - ctx.end_idx)
    max_new = ctx.sampling_params.max_new_tokens
    if max_new is not None:
        budget = min(budget, max_new - ctx.num_generated)
    return max(budget, 0)


def wants_echo(ctx: TextContext) -> bool:
    """Echo log-probabilities are computed once, for the original prompt, and only with ``logprobs > 0``."""
    return ctx.log_probabilities_echo and ctx.log_probabilities > 0 and ctx.num_generated == 0


def echo_targets(ctx: TextContext, n: int) -> np.ndarray:
    """For the next ``n`` prompt positions, the prompt token that follows each one (-1 after the prompt's end).

    Across chunks the target of a chunk's last position is the first token of the next chunk.
    """
    prompt = ctx.prompt_tokens
    follow = np.arange(ctx.start_idx + 1, ctx.start_idx + n + 1)  # [n]
    return np.where(follow < prompt.size, prompt[np.minimum(follow, prompt.size - 1)], -1).astype(np.int32)
