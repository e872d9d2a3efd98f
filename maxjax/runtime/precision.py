"""The precision policy: which dtype "auto" means on this backend, and how precise a float32 matmul is.

Why it exists: XLA on NVIDIA GPUs computes float32 dots with TF32 (10-bit mantissa) unless asked otherwise,
so ``dtype="float32"`` alone does not give float32 results there (SmolLM2-shape logits moved by ~1e-2). Every
compiled program is therefore traced under an explicit matmul precision: ``"highest"`` (true float32) by
default for float32, ``"default"`` (the backend's fastest pass: TF32 on GPU, bf16 passes on TPU) when a user
asks for speed. The precision lands in each dot's ``precision_config`` in the lowered program, so it holds on
every backend and can be read back from the program text.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

DTYPES = ("auto", "float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")


def check_dtype(dtype: Any, field: str = "dtype") -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{field} must be one of {DTYPES}, got {dtype!r}")


def resolve_dtype(dtype: str) -> str:
    """"auto" -> bfloat16 on GPU/TPU (half the bytes per decode step, native MXU/tensor-core type), float32 on
    the CPU (XLA CPU runs bfloat16 dots ~3x slower than float32). Any other value is returned as is."""
    check_dtype(dtype)
    if dtype != "auto":
        return dtype
    import jax  # only here and in traced programs: the config stays importable without JAX

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def jax_dtype(dtype: str):
    """The array dtype of a resolved ``RuntimeConfig.dtype`` (activations and the KV cache)."""
    import jax.numpy as jnp

    return jnp.bfloat16 if dtype == "bfloat16" else jnp.float32


def resolve_matmul_precision(precision: str | None, dtype: str, field: str = "matmul_precision") -> str:
    """None -> "default" for bfloat16 (already one pass), else "highest" (float32 means float32)."""
    if precision is None:
        return "default" if dtype == "bfloat16" else "highest"
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"{field} must be one of {MATMUL_PRECISIONS} or None, got {precision!r}")
    return precision


def with_matmul_precision(fn: Callable, precision: str) -> Callable:
    """``fn`` traced under ``jax.default_matmul_precision(precision)``: every dot and convolution it builds
    (einsum, ``@``, ``lax.conv``) carries that precision, however deep in the model math it is."""
    import jax

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.default_matmul_precision(precision):
            return fn(*args, **kwargs)

    return traced
