"""The AudioGenerator: Orpheus text-to-speech over the text runtime (speech tokens) and SNAC (audio).

One `next_chunk(batch)` call:
  1. the speech-token stage (a `TextGenerationPipeline`, unchanged) advances every context by up to `num_steps`
     tokens in one `next_token` call;
  2. each request's new tokens go through its `AudioTokenParser` (invalid tokens are skipped, as the reference);
  3. every newly completed frame i >= 3 of every request gives one sliding window (frames i-3..i); all valid
     windows of the whole batch are decoded by ONE bucketed `SnacDecoder` call, and each keeps the samples of its
     second frame: consecutive chunks join seamlessly, exactly as Orpheus's streaming decoder;
  4. each request gets an `AudioGeneratorOutput` with its new samples (float32 in [-1, 1]), or, for
     `streaming=False`, nothing until the final chunk, which carries the whole clip.

Like the reference decoder, the audio of the first frame and of the last two frames is never emitted.

Checkpoints (`load_audio_pipeline(model)`): `model` is an HF Llama folder of an Orpheus model (config.json,
*.safetensors, tokenizer.json + tokenizer_config.json) and the SNAC 24 kHz codec lives in `model/snac/`
(config.json + model.safetensors; see `maxjax.weights.snac` for converting the published pytorch_model.bin), or
anywhere given as `snac=`. `model=None` builds small random models (`maxjax.pipelines.orpheus_random`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from maxjax.context import AudioContext
from maxjax.interfaces import AudioGenerationMetadata, AudioGenerationRequest, AudioGeneratorOutput, PipelineTask
from maxjax.interfaces import SamplingParams, TextGenerationInputs
from maxjax.pipelines.audio_tokenizer import AudioTokenizer
from maxjax.pipelines.orpheus import (STREAM_KEEP_FRAME, STREAM_WINDOW_FRAMES, TOKENS_PER_FRAME, AudioTokenParser,
                                      OrpheusVocab, frames_to_codes, frames_valid, stream_windows)

log = logging.getLogger(__name__)

DEFAULT_NUM_STEPS = 16
BUFFER_FRAMES = STREAM_WINDOW_FRAMES  # frames returned as buffer_speech_tokens: one window of left context

__all__ = ["AudioGeneratorPipeline", "AudioTokenizer", "TTS", "load_audio_pipeline", "speak_to_file"]


@dataclasses.dataclass
class _Stream:
    """Per-request decoding state: parsed codes, the next frame to emit, chunks held back (non-streaming)."""

    parser: AudioTokenParser
    next_frame: int
    chunk_id: int = 0
    held: list = dataclasses.field(default_factory=list)
    finished: bool = False  # the final chunk went out: later calls return nothing


def max_windows_per_request(num_steps: int) -> int:
    """Most frames one request can complete in a chunk of `num_steps` tokens (6 codes may be pending)."""
    return (TOKENS_PER_FRAME - 1 + num_steps) // TOKENS_PER_FRAME


class AudioGeneratorPipeline:
    """Implements `AudioGenerator` over a speech-token `TextGenerationPipeline` and a `SnacDecoder`."""

    def __init__(self, speech: Any, decoder: Any, vocab: OrpheusVocab, *, num_steps: int = DEFAULT_NUM_STEPS,
                 model_name: str = "", drop_zero_codes: bool = False):
        if not 1 <= num_steps <= speech.config.max_num_steps:
            raise ValueError(f"num_steps must be in [1, {speech.config.max_num_steps}] (the runtime's "
                             f"max_num_steps), got {num_steps}")
        self.speech = speech
        self.decoder = decoder
        self.vocab = vocab
        self.num_steps = num_steps
        self.model_name = model_name
        self.drop_zero_codes = drop_zero_codes
        self._streams: dict[str, _Stream] = {}
        self._prev_num_steps = 0

    # -- AudioGenerator ------------------------------------------------------------------------------
    @property
    def decoder_sample_rate(self) -> int:
        return self.decoder.cfg.sampling_rate

    @property
    def prev_num_steps(self) -> int:
        """The most speech tokens any request received in the previous `next_chunk` call."""
        return self._prev_num_steps

    def warmup(self) -> int:
        """Compile every speech-token program and every decoder bucket a chunk can use; returns the count."""
        window = STREAM_WINDOW_FRAMES
        n = self.speech.warmup()
        n += self.decoder.warmup([(b, window) for b in self.decoder.batch_buckets])
        return n

    def add_lora(self, name: str, path: str | Path) -> None:
        """Loads a PEFT adapter of the speech model as `name`; requests pick it with `lora` (compiles nothing)."""
        self.speech.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.speech.remove_lora(name)

    def next_chunk(self, batch: dict[str, AudioContext]) -> dict[str, AudioGeneratorOutput]:
        start = time.perf_counter()
        for rid, ctx in batch.items():
            if not isinstance(ctx, AudioContext):
                raise ValueError(f"request {rid!r}: batch values must be AudioContext, got {type(ctx).__name__}")
        before = {rid: ctx.num_generated for rid, ctx in batch.items()}
        outputs = self.speech.next_token(TextGenerationInputs(batch, self.num_steps))
        streams = {rid: self._stream(ctx) for rid, ctx in batch.items()}
        self._prev_num_steps = max((ctx.num_generated - before[rid] for rid, ctx in batch.items()), default=0)

        # Every new window of every request, in one decoder call.
        windows, owners = [], []
        for rid, ctx in batch.items():
            stream = streams[rid]
            stream.parser.push(outputs[rid].tokens)
            frames = stream.parser.frames()
            first = max(stream.next_frame, STREAM_WINDOW_FRAMES - 1)
            if len(frames) > first:
                new = stream_windows(frames, first, len(frames))  # [W, 4, 7]
                keep = np.all(frames_valid(self.vocab, new), axis=-1)  # [W]: out-of-range codes emit nothing
                windows.append(new[keep])
                owners += [rid] * int(keep.sum())
            stream.next_frame = max(stream.next_frame, len(frames))
        audio_by_rid: dict[str, list[np.ndarray]] = {rid: [] for rid in batch}
        if owners:
            spf = self.decoder.samples_per_frame
            audio = self.decoder.decode_frames(frames_to_codes(np.concatenate(windows)))  # [W, 4 * spf]
            kept = audio[:, STREAM_KEEP_FRAME * spf:(STREAM_KEEP_FRAME + 1) * spf]  # [W, spf]
            for rid, chunk in zip(owners, kept):
                audio_by_rid[rid].append(chunk)

        elapsed = time.perf_counter() - start
        return {rid: self._output(ctx, streams[rid], audio_by_rid[rid], elapsed) for rid, ctx in batch.items()}

    def release(self, context: AudioContext) -> None:
        """Free the request's KV cache slot in the speech stage and its decoding state."""
        rid = context.request_id
        self._streams.pop(rid, None)
        if self.speech.slots.slot_of(rid) is not None:
            self.speech.release(rid)

    # -- helpers -------------------------------------------------------------------------------------
    def _stream(self, ctx: AudioContext) -> _Stream:
        stream = self._streams.get(ctx.request_id)
        if stream is None:
            parser = AudioTokenParser(self.vocab, drop_zero_codes=self.drop_zero_codes)
            buffered = 0
            if ctx.buffer_speech_tokens is not None and len(ctx.buffer_speech_tokens):
                # Left context from a previous request: its complete frames only, so the new tokens start a frame.
                previous = AudioTokenParser(self.vocab, drop_zero_codes=self.drop_zero_codes)
                previous.push(ctx.buffer_speech_tokens)
                buffered = previous.num_frames
                parser.codes = previous.codes[: buffered * TOKENS_PER_FRAME]
            stream = self._streams[ctx.request_id] = _Stream(parser, next_frame=buffered)
        return stream

    def _buffer_tokens(self, stream: _Stream) -> np.ndarray:
        """The token ids of the last BUFFER_FRAMES complete frames (for a follow-up request)."""
        frames = stream.parser.frames()[-BUFFER_FRAMES:]  # [n, 7]
        slots = np.arange(TOKENS_PER_FRAME) * self.vocab.codebook_size + self.vocab.audio_token_offset
        return (frames.astype(np.int64) + slots).reshape(-1).astype(np.int32)

    def _output(self, ctx: AudioContext, stream: _Stream, chunks: list[np.ndarray],
                elapsed: float) -> AudioGeneratorOutput:
        audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0,), np.float32)
        done = ctx.is_done
        if not ctx.streaming and not stream.finished:
            stream.held.append(audio)
            audio = np.concatenate(stream.held) if done else np.zeros((0,), np.float32)
        if stream.finished:
            audio = np.zeros((0,), np.float32)
        stream.finished = done
        rate = self.decoder_sample_rate
        metadata = AudioGenerationMetadata(
            sample_rate=rate, duration=audio.size / rate, chunk_id=stream.chunk_id, final_chunk=done,
            model_name=self.model_name, request_id=ctx.request_id, tokens_generated=ctx.num_generated,
            processing_time=elapsed)
        stream.chunk_id += 1
        return AudioGeneratorOutput(audio_data=audio, metadata=metadata, is_done=done,
                                    buffer_speech_tokens=self._buffer_tokens(stream))


# ---------------------------------------------------------------------------------------------- loading


def _runtime_config(runtime: dict[str, Any]):
    from maxjax.runtime.config import RuntimeConfig

    unknown = sorted(set(runtime) - {f.name for f in dataclasses.fields(RuntimeConfig)})
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; see maxjax.runtime.config.RuntimeConfig and "
                         "load_audio_pipeline")
    return RuntimeConfig(**runtime)


def load_audio_pipeline(model: str | Path | None = None, task: PipelineTask | str = PipelineTask.AUDIO_GENERATION,
                        *, snac: str | Path | None = None, num_steps: int = DEFAULT_NUM_STEPS,
                        voice: str | None = None, voices: list[str] | None = None,
                        max_new_tokens: int | None = None, warmup: bool = False, seed: int = 0,
                        lora_adapters: dict[str, str | Path] | None = None, progress: bool = False,
                        **runtime: Any) -> tuple[AudioTokenizer, Any]:
    """(AudioTokenizer, AudioGeneratorPipeline) for an Orpheus checkpoint (see the module docstring for the layout),
    or small random models when `model` is None.

    task=SPEECH_TOKEN_GENERATION returns the token stage alone: (AudioTokenizer, TextGenerationPipeline).
    `runtime` holds `RuntimeConfig` fields of the speech stage (max_batch_size, max_seq_len, length_buckets, ...).
    `lora_adapters` ({name: PEFT folder}) adapt the speech stage; a request's `lora` picks one.
    `progress=True` reports each loading phase on stderr.
    """
    import jax

    from maxjax.architectures import llama, llama_sharding
    from maxjax.pipelines.registry import read_lora_adapters, serve_lora_adapters, size_for_lora
    from maxjax.pipelines.text import TextGenerationPipeline
    from maxjax.runtime.compile_cache import enable_compile_cache
    from maxjax.runtime.engine import Engine
    from maxjax.runtime.snac_decoder import SnacDecoder

    task = PipelineTask(task)
    if task not in (PipelineTask.AUDIO_GENERATION, PipelineTask.SPEECH_TOKEN_GENERATION):
        raise ValueError(f"task must be audio_generation or speech_token_generation, got {task.value!r}")
    from maxjax.pipelines.registry import warm_up
    from maxjax.progress import Phases

    runtime.setdefault("max_num_steps", num_steps)
    config = _runtime_config(runtime)
    phases = Phases(progress)
    phases("reading the speech model %s", model if model is not None else "(small random Orpheus models)")
    enable_compile_cache(config.compile_cache_dir)
    if model is None:
        from maxjax.pipelines import orpheus_random

        log.warning("no Orpheus checkpoint given: using small RANDOM models (the audio is noise, not speech)")
        text_tokenizer = orpheus_random.orpheus_tokenizer(config.max_seq_len)
        cfg, params = orpheus_random.random_orpheus_llama(
            orpheus_random.orpheus_llama_config(max_position_embeddings=max(config.max_seq_len, 8192)), seed)
        name = "orpheus-random"
    else:
        from maxjax.weights import load_weights

        weights = load_weights(model, config.dtype)
        cfg, params, text_tokenizer, name = weights.config, weights.params, weights.tokenizer, weights.name
        if text_tokenizer is None:
            raise ValueError(f"model: {model} has no tokenizer files")
    if config.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"max_seq_len {config.max_seq_len} exceeds the model's context length "
                         f"{cfg.max_position_embeddings}")
    adapters = read_lora_adapters(lora_adapters, cfg)
    config = size_for_lora(config, adapters, runtime)
    text_tokenizer.max_length = min(text_tokenizer.max_length, config.max_seq_len)
    tokenizer = AudioTokenizer(text_tokenizer, voice=voice, voices=voices,
                               **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}))
    # On a mesh (tensor_parallel / data_parallel) the engine places the host params shard by shard.
    placed = jax.device_put(params) if config.num_devices == 1 else params
    speech = TextGenerationPipeline(Engine(llama, cfg, placed, config, layout=llama_sharding), tokenizer, name)
    serve_lora_adapters(speech, tokenizer, adapters)
    phases("speech stage %s on the device in %.1f s", name, phases.elapsed())
    if task is PipelineTask.SPEECH_TOKEN_GENERATION:
        if warmup:
            warm_up(speech, phases)
        return tokenizer, speech

    snac_params, snac_cfg = _load_snac(model, snac, seed)
    windows = max(1, config.max_batch_size * max_windows_per_request(num_steps))
    from maxjax.runtime.config import powers_of_two
    from maxjax.runtime.precision import resolve_matmul_precision

    # The codec runs in float32 whatever the speech dtype: full float32 dots unless a precision was asked for.
    decoder = SnacDecoder(snac_params, snac_cfg, frame_buckets=(STREAM_WINDOW_FRAMES,),
                          batch_buckets=powers_of_two(1, windows),
                          matmul_precision=resolve_matmul_precision(runtime.get("matmul_precision"), "float32"))
    pipeline = AudioGeneratorPipeline(speech, decoder, tokenizer.vocab, num_steps=num_steps, model_name=name)
    phases("SNAC codec loaded: %s ready in %.1f s", name, phases.elapsed())
    if warmup:
        warm_up(pipeline, phases)
    return tokenizer, pipeline


def _load_snac(model: str | Path | None, snac: str | Path | None, seed: int):
    from maxjax.architectures.snac import SnacConfig
    from maxjax.weights.snac import load_snac, params_from_torch_state

    if snac is None and model is not None and (Path(model) / "snac" / "config.json").is_file():
        snac = Path(model) / "snac"
    if snac is not None:
        return load_snac(snac)
    if model is not None:
        raise ValueError(f"snac: no SNAC codec at {Path(model) / 'snac'}; pass snac=<folder with config.json and "
                         "model.safetensors>")
    from maxjax.pipelines.orpheus_random import random_snac_state

    cfg = SnacConfig()
    return params_from_torch_state(random_snac_state(cfg, seed), cfg), cfg


# ---------------------------------------------------------------------------------------------- notebooks


# AudioGenerationRequest fields a TTS call may set by keyword (the rest: ids, model, input, sampling_params).
AUDIO_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(AudioGenerationRequest)) - {
    "request_id", "index", "model", "input", "sampling_params"}


class TTS:
    """Text-to-speech for notebooks and scripts: `TTS(model).tts("Hello")` -> (float32 samples, sample rate).

    `model` and `config` are those of `load_audio_pipeline` (None: random models). Requests run one at a time.
    `progress=False` silences the line per loading phase.
    """

    def __init__(self, model: str | Path | None = None, *, progress: bool = True, **config: Any):
        config.setdefault("max_batch_size", 1)
        self.tokenizer, self.pipeline = load_audio_pipeline(model, PipelineTask.AUDIO_GENERATION, progress=progress,
                                                            **config)
        self.model_name = self.pipeline.model_name
        self._count = 0

    @property
    def sample_rate(self) -> int:
        return self.pipeline.decoder_sample_rate

    def stream(self, text: str, voice: str | None = None, sampling_params: SamplingParams | None = None,
               **request: Any) -> Iterator[np.ndarray]:
        """Yield audio chunks (float32, [-1, 1]) as they are decoded."""
        unknown = sorted(set(request) - AUDIO_REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown keyword argument(s) {unknown}: expected AudioGenerationRequest fields "
                             f"{sorted(AUDIO_REQUEST_FIELDS)}")
        self._count += 1
        model = f"{self.model_name}:{voice}" if voice else self.model_name
        req = AudioGenerationRequest(request_id=f"tts-{self._count}", index=0, model=model, input=text,
                                     sampling_params=sampling_params or SamplingParams(), **request)
        ctx = self.tokenizer.build_context(req)
        try:
            while True:
                out = self.pipeline.next_chunk({ctx.request_id: ctx})[ctx.request_id]
                if out.audio_data.size:
                    yield out.audio_data
                if out.is_done:
                    return
        finally:
            self.pipeline.release(ctx)

    def tts(self, text: str, voice: str | None = None, sampling_params: SamplingParams | None = None,
            **request: Any) -> tuple[np.ndarray, int]:
        """The whole clip for `text`: (float32 samples in [-1, 1], sample rate)."""
        chunks = list(self.stream(text, voice, sampling_params, **request))
        audio = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
        return audio, self.sample_rate


def speak_to_file(text: str, path: str | Path, model: str | Path | None = None, voice: str | None = None,
                  sampling_params: SamplingParams | None = None, progress: bool = True,
                  **config: Any) -> dict[str, Any]:
    """Speak `text` into a 24 kHz 16-bit WAV at `path`; returns what was done (for the CLI to print)."""
    import soundfile

    start = time.perf_counter()
    tts = TTS(model, progress=progress, **config)
    audio, rate = tts.tts(text, voice=voice, sampling_params=sampling_params)
    soundfile.write(str(path), audio, rate, subtype="PCM_16")
    return {"path": str(path), "sample_rate": rate, "samples": int(audio.size), "duration_s": audio.size / rate,
            "model": tts.model_name, "random_weights": model is None, "seconds": time.perf_counter() - start}
