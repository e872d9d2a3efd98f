"""What the machine allows: the device's read bandwidth (for the decode roofline) and its load.

Why several kernels: one numpy thread summing a buffer reads well below what the memory system delivers
(llama.cpp's float32 decode of SmolLM2 reads faster than that figure), so the roofline it implies is too
low and a fraction of it flatters. The figure reported is the best of a jitted reduction and a jitted
matrix-vector product on the device (what a decode step does), plus, on the CPU, numpy sums on every core
and BLAS's threaded matrix-vector product.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _best_rate(fn, nbytes: int, repeats: int) -> float:
    fn()  # compile / warm
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Bytes/s read by each kernel over a ``gib`` GiB float32 buffer (larger than any cache), and the best."""
    import jax
    import jax.numpy as jnp

    n = int(gib * (1 << 30)) // 4
    cols = 4096
    device_buf = jnp.ones((n // cols, cols), jnp.float32)  # made on the device, never copied from the host
    vector = jnp.ones((1, n // cols), jnp.float32)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    gemv = jax.jit(lambda v, a: v @ a)
    rates = {"jit_sum": _best_rate(lambda: total(device_buf).block_until_ready(), device_buf.nbytes, repeats),
             "jit_gemv": _best_rate(lambda: gemv(vector, device_buf).block_until_ready(), device_buf.nbytes,
                                    repeats)}
    del device_buf
    if jax.default_backend() == "cpu":
        host_buf = np.ones(n, np.float32)
        threads = os.cpu_count() or 1
        parts = np.array_split(host_buf, threads)
        with ThreadPoolExecutor(threads) as pool:
            rates[f"numpy_{threads}_threads"] = _best_rate(lambda: list(pool.map(np.sum, parts)), host_buf.nbytes,
                                                           repeats)
        # BLAS's matrix-vector product (its own threads): the access pattern of a decode step, as llama.cpp runs it.
        matrix, ones = host_buf.reshape(-1, cols), np.ones(cols, np.float32)
        rates["numpy_blas_gemv"] = _best_rate(lambda: matrix @ ones, host_buf.nbytes, repeats)
    rates["best"] = max(rates.values())
    return rates


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
