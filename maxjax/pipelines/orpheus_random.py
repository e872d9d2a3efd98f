"""Small random-initialised Orpheus models for tests, demos and `maxjax speak` without a checkpoint.

No Orpheus checkpoint ships on a package registry, so this builds models of the real architectures:

- a tokenizer with the Orpheus (Llama-3 based) id layout: byte-level text tokens, `<|begin_of_text|>` = 128000,
  `<|eot_id|>` = 128009 and `<custom_token_N>` = 128256 + N for every marker and every audio code;
- a small Llama over that vocabulary (156940 ids) whose embeddings and output head are shaped so that greedy
  decoding emits audio tokens in the right 7-slot position cycle (random codes within each slot) and, after some
  frame-closing tokens, the end-of-speech token: the speech tokens of a random model then decode to real frames;
- SNAC 24 kHz from its real config with random weights, as a torch-layout state dict (weight-norm g/v pairs), so
  the same loader that reads a real checkpoint converts it.

`save_random_orpheus(folder)` writes both as checkpoint folders in the layout `load_audio_pipeline` reads
(`folder/` an HF Llama folder, `folder/snac/` a SNAC folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maxjax.architectures.llama import LlamaConfig
from maxjax.architectures.snac import RESIDUAL_DILATIONS, SnacConfig
from maxjax.pipelines.orpheus import TOKENS_PER_FRAME, OrpheusVocab

BEGIN_OF_TEXT = 128000
NUM_CUSTOM_TOKENS = 10 + TOKENS_PER_FRAME * 4096 + 2  # markers, 7 x 4096 codes, 2 spare ids (vocab 156940)
ORPHEUS_VOCAB_SIZE = OrpheusVocab().custom_token_base + NUM_CUSTOM_TOKENS  # 156940, as the released models
STOP_EVERY = 20  # about one frame-closing code in STOP_EVERY ends the speech (so random clips stay short)

_SLOT_DIMS = TOKENS_PER_FRAME  # hidden dims 0..6: "the last token sat in slot j"; dim 7: "stop now"
_STOP_DIM = TOKENS_PER_FRAME


# ---------------------------------------------------------------------------------------------- tokenizer


def orpheus_tokenizer(max_length: int = 8192):
    """A `maxjax.tokenizers.HFTokenizer` with the Orpheus special-token layout over a byte-level text vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from maxjax.tokenizers import HFTokenizer

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    names = {BEGIN_OF_TEXT: "<|begin_of_text|>", BEGIN_OF_TEXT + 1: "<|end_of_text|>", 128009: "<|eot_id|>"}
    for i in range(len(vocab), OrpheusVocab().custom_token_base):
        vocab[names.get(i, f"<|reserved_{i}|>")] = i
    for n in range(NUM_CUSTOM_TOKENS):
        vocab[f"<custom_token_{n}>"] = OrpheusVocab().custom_token_base + n
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([*names.values(), *(f"<custom_token_{n}>" for n in range(NUM_CUSTOM_TOKENS))])
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", BEGIN_OF_TEXT)])
    return HFTokenizer(tk, max_length=max_length, eos_token_ids=[OrpheusVocab().end_of_speech],
                       bos_token_id=BEGIN_OF_TEXT, add_bos_token=True)


# ---------------------------------------------------------------------------------------------- speech LM


def orpheus_llama_config(hidden_size: int = 64, num_layers: int = 2, max_position_embeddings: int = 8192) -> LlamaConfig:
    return LlamaConfig(vocab_size=ORPHEUS_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=hidden_size // 4,
                       rope_theta=500000.0, max_position_embeddings=max_position_embeddings)


def random_orpheus_llama(cfg: LlamaConfig | None = None, seed: int = 0,
                         vocab: OrpheusVocab | None = None) -> tuple[LlamaConfig, dict]:
    """(config, numpy params) of a random Llama whose greedy continuation of a speech prompt is audio tokens.

    The residual stream of a small random Llama is dominated by the last token's embedding, so: an audio token in
    slot j (and the start-of-speech marker, as "slot 6") embeds as a unit vector on dim j plus small noise; the output
    head scores every audio token of slot (j + 1) mod 7 on dim j, while small random weights pick the code within the
    slot. Slot-6 codes divisible by STOP_EVERY also set dim 7, which the end-of-speech row scores twice as high.
    """
    cfg = cfg or orpheus_llama_config()
    vocab = vocab or OrpheusVocab()
    if cfg.vocab_size < vocab.audio_token_offset + TOKENS_PER_FRAME * vocab.codebook_size:
        raise ValueError(f"cfg.vocab_size {cfg.vocab_size} is too small for the Orpheus audio tokens")
    if cfg.hidden_size <= _STOP_DIM + 1:
        raise ValueError(f"cfg.hidden_size must exceed {_STOP_DIM + 1}")
    from maxjax.architectures.llama import param_shapes

    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    params = {"layers": {k: (0.02 * rng.standard_normal(shape)).astype(np.float32)
                         for k, shape in shapes["layers"].items()}}
    for norm in ("attn_norm", "mlp_norm"):
        params["layers"][norm] = (1.0 + 0.1 * rng.standard_normal(shapes["layers"][norm])).astype(np.float32)
    params["final_norm"] = np.ones(shapes["final_norm"], np.float32)
    d = cfg.hidden_size
    embed = (0.05 * rng.standard_normal((cfg.vocab_size, d))).astype(np.float32)  # [V, D]
    embed[:, : _STOP_DIM + 1] = 0.0
    head = np.zeros((d, cfg.vocab_size), np.float32)  # [D, V]
    head[_STOP_DIM + 1:] = 0.1 * rng.standard_normal((d - _STOP_DIM - 1, cfg.vocab_size))
    n = vocab.codebook_size
    for slot in range(TOKENS_PER_FRAME):
        ids = slice(vocab.audio_token_offset + slot * n, vocab.audio_token_offset + (slot + 1) * n)
        embed[ids, slot] = 1.0
        head[(slot - 1) % TOKENS_PER_FRAME, ids] = 1.0
    last_slot = vocab.audio_token_offset + (TOKENS_PER_FRAME - 1) * n
    embed[last_slot: last_slot + n: STOP_EVERY, _STOP_DIM] = 1.0
    embed[vocab.start_of_speech, TOKENS_PER_FRAME - 1] = 1.0
    head[_STOP_DIM, vocab.end_of_speech] = 2.0
    params["embed"] = embed
    params["lm_head"] = head
    return cfg, params


# ---------------------------------------------------------------------------------------------- SNAC


def snac_state_shapes(cfg: SnacConfig) -> dict[str, tuple[int, ...]]:
    """Torch names and shapes of every tensor SNAC decoding reads (weight norm as original0 = g, original1 = v)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, c_out: int, c_in: int, k: int, bias: bool = True, transpose: bool = False):
        shapes[f"{prefix}.parametrizations.weight.original0"] = (c_in if transpose else c_out, 1, 1)
        shapes[f"{prefix}.parametrizations.weight.original1"] = (c_in, c_out, k) if transpose else (c_out, c_in, k)
        if bias:
            shapes[f"{prefix}.bias"] = (c_out,)

    for level in range(len(cfg.vq_strides)):
        shapes[f"quantizer.quantizers.{level}.codebook.weight"] = (cfg.codebook_size, cfg.codebook_dim)
        conv(f"quantizer.quantizers.{level}.out_proj", cfg.latent_dim, cfg.codebook_dim, 1)
    idx = 0
    if cfg.depthwise:
        conv("decoder.model.0", cfg.latent_dim, 1, 7)
        conv("decoder.model.1", cfg.decoder_dim, cfg.latent_dim, 1)
        idx = 2
    else:
        conv("decoder.model.0", cfg.decoder_dim, cfg.latent_dim, 7)
        idx = 1
    channels = cfg.decoder_dim
    for stride in cfg.decoder_rates:
        out = channels // 2
        prefix = f"decoder.model.{idx}.block"
        shapes[f"{prefix}.0.alpha"] = (1, channels, 1)
        conv(f"{prefix}.1", out, channels, 2 * stride, transpose=True)
        sub = 2
        if cfg.noise:
            conv(f"{prefix}.2.linear", out, out, 1, bias=False)
            sub = 3
        for _ in RESIDUAL_DILATIONS:
            unit = f"{prefix}.{sub}.block"
            shapes[f"{unit}.0.alpha"] = (1, out, 1)
            conv(f"{unit}.1", out, 1 if cfg.depthwise else out, 7)
            shapes[f"{unit}.2.alpha"] = (1, out, 1)
            conv(f"{unit}.3", out, out, 1)
            sub += 1
        channels = out
        idx += 1
    shapes[f"decoder.model.{idx}.alpha"] = (1, channels, 1)
    conv(f"decoder.model.{idx + 1}", 1, channels, 7)
    return shapes


def random_snac_state(cfg: SnacConfig | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A random SNAC state dict in torch layout: torch-like fan-in init, weight-norm gains ||v|| times a random
    factor, Snake alphas in [0.5, 2], codebook entries standard normal."""
    cfg = cfg or SnacConfig()
    rng = np.random.default_rng(seed)
    state: dict[str, np.ndarray] = {}
    for name, shape in snac_state_shapes(cfg).items():
        if name.endswith("original1"):
            fan_in = shape[1] * shape[2]
            state[name] = rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(fan_in)
        elif name.endswith("alpha"):
            state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif name.endswith("bias"):
            state[name] = rng.uniform(-0.05, 0.05, shape).astype(np.float32)
        elif name.endswith("codebook.weight"):
            state[name] = rng.standard_normal(shape).astype(np.float32)
    for name in [n for n in state if n.endswith("original1")]:
        v = state[name]
        norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(1, 2), keepdims=True))
        gain = rng.uniform(0.7, 1.3, norm.shape)
        state[name.replace("original1", "original0")] = (norm * gain).astype(np.float32)
    return state


def snac_config_dict(cfg: SnacConfig) -> dict:
    return {"sampling_rate": cfg.sampling_rate, "encoder_dim": cfg.encoder_dim, "encoder_rates": list(cfg.encoder_rates),
            "latent_dim": cfg.latent_dim, "decoder_dim": cfg.decoder_dim, "decoder_rates": list(cfg.decoder_rates),
            "attn_window_size": cfg.attn_window_size, "codebook_size": cfg.codebook_size,
            "codebook_dim": cfg.codebook_dim, "vq_strides": list(cfg.vq_strides), "noise": cfg.noise,
            "depthwise": cfg.depthwise}


# ---------------------------------------------------------------------------------------------- folders


def save_random_orpheus(folder: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write a random Orpheus checkpoint: `folder/` (HF Llama: config.json, model.safetensors, tokenizer files)
    and `folder/snac/` (config.json, model.safetensors), the layout `load_audio_pipeline(folder)` reads."""
    from safetensors.numpy import save_file

    from maxjax.weights.llama_names import checkpoint_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg, params = random_orpheus_llama(orpheus_llama_config(hidden_size, num_layers), seed)
    tensors = {}
    for key, value in params.items():
        if key == "layers":
            continue
        tensors[checkpoint_name(key, "hf")] = value.T.copy() if key == "lm_head" else value
    for key, stacked in params["layers"].items():
        for layer in range(cfg.num_layers):
            value = stacked[layer]
            tensors[checkpoint_name(key, "hf", layer)] = value.T.copy() if value.ndim == 2 else value.copy()
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(
        {**cfg.to_hf(), "bos_token_id": BEGIN_OF_TEXT, "eos_token_id": OrpheusVocab().end_of_speech}, indent=2))
    orpheus_tokenizer(cfg.max_position_embeddings).save(folder)

    snac_dir = folder / "snac"
    snac_dir.mkdir(exist_ok=True)
    snac_cfg = SnacConfig()
    save_file(random_snac_state(snac_cfg, seed), str(snac_dir / "model.safetensors"))
    (snac_dir / "config.json").write_text(json.dumps(snac_config_dict(snac_cfg), indent=2))
    return folder
