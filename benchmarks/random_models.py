"""Random-weight HF folders of real Llama-family shapes, written once into a cache folder, for benchmarks
that must run without downloads (an accelerator VM with no hub access).

A folder holds config.json, safetensors shards (+ index), and a byte-level tokenizer (tokenizer.json,
tokenizer_config.json) of the model's vocabulary size, so maxjax and HF transformers load the same files.
Weights are normal(0, 0.02) (norms 1): the numbers are meaningless, the shapes and bytes are the real ones.
On the CPU (``cpu=True``) the large shapes keep their layer widths but run 2 layers and a 32768-token
vocabulary, so the command finishes on a laptop; the per-layer matmuls are still the real ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

# HF LlamaConfig fields of the published models (SmolLM2-135M, Llama-3.2-1B, Llama-3-8B).
SHAPES: dict[str, dict] = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                    rope_theta=100000.0, max_position_embeddings=8192, torch_dtype="float32"),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=131072, torch_dtype="bfloat16",
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                     rope_theta=500000.0, max_position_embeddings=8192, torch_dtype="bfloat16"),
}
CPU_OVERRIDES = {"llama-1b": dict(num_hidden_layers=2, vocab_size=32768, torch_dtype="float32"),
                 "llama-8b": dict(num_hidden_layers=2, vocab_size=32768, torch_dtype="float32")}
QUICK = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, torch_dtype="float32")
SHARD_BYTES = 4 << 30
EOS = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class RandomModel:
    name: str
    folder: Path
    config: dict
    dtype: str  # the stored (and benchmarked) dtype: "float32" or "bfloat16"


def shape_config(name: str, cpu: bool, quick: bool) -> dict:
    if name not in SHAPES:
        raise ValueError(f"--random-shape must be one of {sorted(SHAPES)}, got {name!r}")
    config = {**SHAPES[name], **(CPU_OVERRIDES.get(name, {}) if cpu else {}), **(QUICK if quick else {})}
    return dict(config, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=0, attention_bias=False, mlp_bias=False)


def ensure_random_model(name: str, cache_dir: str | Path, cpu: bool = False, quick: bool = False,
                        seed: int = 0) -> RandomModel:
    """The folder of shape ``name`` under ``cache_dir`` (named by a hash of its config), written if absent."""
    config = shape_config(name, cpu, quick)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(cache_dir).expanduser() / f"{name}-{digest}"
    if not (folder / "done").is_file():
        _write_folder(folder, config, seed)
    return RandomModel(name, folder, config, config["torch_dtype"])


def _tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names -> shapes ([out, in] for linear weights)."""
    D, F, V, Dh = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * Dh, c["num_key_value_heads"] * Dh
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
                       p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    return shapes


def _write_folder(folder: Path, config: dict, seed: int) -> None:
    """Shards of at most SHARD_BYTES (so an 8B shape never sits whole in host memory), then the tokenizer."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config["torch_dtype"])
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict] = [{}]
    size = 0
    for tensor_name, shape in _tensor_shapes(config).items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][tensor_name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({tensor_name: file for tensor_name in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(folder, config)
    (folder / "done").write_text("ok\n")


def _write_tokenizer(folder: Path, config: dict) -> None:
    """Byte-level BPE over the 256 byte symbols, padded with placeholder tokens to the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {EOS: 0, "<|begin_of_text|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for i in range(len(vocab), config["vocab_size"]):
        vocab[f"<|reserved_{i}|>"] = i
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS, "<|begin_of_text|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "bos_token": "<|begin_of_text|>", "add_bos_token": False,
         "model_max_length": config["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast"}))
