"""Bucketed, ahead-of-time compiled SNAC decoding: numpy codes in, numpy audio out.

Batches are padded to a (batch, frames) bucket; each row carries its true frame count into the program, whose
convolutions mask the padding, so a padded row decodes exactly as it would alone at its own length. Every program
is compiled once per bucket shape (`warmup()` compiles the expected ones), and `compile_count` exposes how many
exist so a caller can assert that nothing compiles after warm-up.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maxjax.architectures import snac as snac_arch
from maxjax.architectures.snac import Params, SnacConfig
from maxjax.runtime.precision import with_matmul_precision

DEFAULT_FRAME_BUCKETS = (4, 8, 16, 32, 64, 128, 256)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8)
STREAM_WINDOW_FRAMES = 4  # frames per streaming window (Orpheus: the last 28 tokens)


def _decode_program(params: Params, codes: list[jax.Array], valid_frames: jax.Array, *, cfg: SnacConfig):
    audio = snac_arch.decode(params, cfg, codes, valid_frames=valid_frames)  # [B, 1, S]
    steps = jnp.arange(audio.shape[-1])[None, :] < (valid_frames * cfg.samples_per_frame)[:, None]  # [B, S]
    return jnp.where(steps, audio[:, 0, :], 0.0)  # [B, S], zero past each row's end


class SnacDecoder:
    """Decode SNAC codes in padded (batch, frames) buckets with one compiled program per bucket.

    A "frame" is one code of the coarsest level (vq_strides[0] finest steps, `cfg.samples_per_frame` samples):
    for the 24 kHz model, the 7 codes of one Orpheus frame and 2048 samples.
    """

    def __init__(
        self,
        params: Params,
        cfg: SnacConfig,
        frame_buckets: Sequence[int] = DEFAULT_FRAME_BUCKETS,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        matmul_precision: str = "highest",
    ):
        for name, buckets in (("frame_buckets", frame_buckets), ("batch_buckets", batch_buckets)):
            if not buckets or any(int(b) < 1 for b in buckets):
                raise ValueError(f"{name}: expected positive sizes, got {tuple(buckets)}")
        self.params = params
        self.cfg = cfg
        self.frame_buckets = tuple(sorted({int(b) for b in frame_buckets}))
        self.batch_buckets = tuple(sorted({int(b) for b in batch_buckets}))
        self._jitted = jax.jit(with_matmul_precision(_decode_program, matmul_precision), static_argnames=("cfg",))
        self._compiled: dict[tuple[int, int], jax.stages.Compiled] = {}

    @property
    def samples_per_frame(self) -> int:
        return self.cfg.samples_per_frame

    @property
    def compile_count(self) -> int:
        """Number of programs compiled so far (one per (batch, frames) bucket used)."""
        return len(self._compiled)

    def warmup(self, shapes: Sequence[tuple[int, int]] | None = None) -> int:
        """Compile the given (batch, frames) buckets; default: every frame bucket at batch 1 (whole clips) and
        every batch bucket at the streaming window size. Returns the compile count."""
        if shapes is None:
            window = self._bucket(self.frame_buckets, STREAM_WINDOW_FRAMES, "num_frames")
            shapes = [(1, f) for f in self.frame_buckets] + [(b, window) for b in self.batch_buckets]
        for batch, frames in shapes:
            self._program(batch, frames)
        return self.compile_count

    def decode_frames(self, codes: Sequence[np.ndarray], num_frames: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """codes: one int array per level, [B, n * vq_strides[0] / stride] -> audio [B, n * samples_per_frame].

        num_frames [B] (optional, each <= n): a row's true length; its samples past that length are zero.
        Batches larger than the largest batch bucket run in several device calls.
        """
        codes = [np.asarray(c) for c in codes]
        if len(codes) != len(self.cfg.vq_strides):
            raise ValueError(f"codes: expected {len(self.cfg.vq_strides)} levels, got {len(codes)}")
        if codes[0].ndim != 2:
            raise ValueError(f"codes: expected [batch, steps] arrays, got shape {codes[0].shape}")
        batch, n = codes[0].shape
        for level, (c, steps) in enumerate(zip(codes, self.cfg.level_steps(n))):
            if c.shape != (batch, steps):
                raise ValueError(f"codes[{level}]: expected shape {(batch, steps)} for {n} frames, got {c.shape}")
            if c.size and (c.min() < 0 or c.max() >= self.cfg.codebook_size):
                raise ValueError(f"codes[{level}]: values must lie in [0, {self.cfg.codebook_size})")
        if num_frames is None:
            num_frames = np.full((batch,), n, np.int32)
        num_frames = np.asarray(num_frames, np.int32)
        if num_frames.shape != (batch,) or (batch and (num_frames.min() < 0 or num_frames.max() > n)):
            raise ValueError(f"num_frames: expected {batch} values in [0, {n}]")
        if batch == 0 or n == 0:
            return np.zeros((batch, n * self.samples_per_frame), np.float32)

        frames_bucket = self._bucket(self.frame_buckets, n, "num_frames")
        out = []
        max_batch = self.batch_buckets[-1]
        for start in range(0, batch, max_batch):
            rows = slice(start, min(start + max_batch, batch))
            count = rows.stop - rows.start
            batch_bucket = self._bucket(self.batch_buckets, count, "batch")
            padded = []
            for c, steps in zip(codes, self.cfg.level_steps(frames_bucket)):
                p = np.zeros((batch_bucket, steps), np.int32)
                p[:count, : c.shape[1]] = c[rows]
                padded.append(p)
            valid = np.zeros((batch_bucket,), np.int32)
            valid[:count] = num_frames[rows]
            audio = self._program(batch_bucket, frames_bucket)(self.params, padded, valid)  # [Bb, Fb * spf]
            out.append(np.asarray(audio)[:count, : n * self.samples_per_frame])
        return np.concatenate(out, axis=0)

    def lower(self, batch: int, frames: int) -> jax.stages.Lowered:
        """The (batch, frames) program before compilation (its text shows what every backend is asked to do)."""
        codes = [jax.ShapeDtypeStruct((batch, s), jnp.int32) for s in self.cfg.level_steps(frames)]
        valid = jax.ShapeDtypeStruct((batch,), jnp.int32)
        return self._jitted.lower(self.params, codes, valid, cfg=self.cfg)

    def _program(self, batch: int, frames: int) -> jax.stages.Compiled:
        key = (batch, frames)
        if key not in self._compiled:
            self._compiled[key] = self.lower(batch, frames).compile()
        return self._compiled[key]

    @staticmethod
    def _bucket(buckets: tuple[int, ...], size: int, name: str) -> int:
        i = bisect.bisect_left(buckets, size)
        if i == len(buckets):
            raise ValueError(f"{name}: {size} exceeds the largest bucket {buckets[-1]}")
        return buckets[i]
