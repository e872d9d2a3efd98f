"""GGUF files of the model families, with a SentencePiece vocabulary, written here with the `gguf` package.

Tensor names come from the `gguf` package's own HF -> GGUF name map (what llama.cpp's converter uses), Gemma
norms get llama.cpp's +1, experts are stacked into one 3-D tensor per layer: each file must give the logits
of the transformers model it was written from. The vocabulary is a SentencePiece BPE model with byte fallback
trained here; maxjax's tokenizer built from the GGUF must give sentencepiece's and transformers' ids.
"""

import gguf
import numpy as np
import pytest
import torch

from maxjax.models import load_model
from maxjax.tokenizers import HFTokenizer
from test_families import build_hf

# llama.cpp's converter writes Mistral and Mixtral as "llama" files (Mixtral with expert tensors)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma": "gemma", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "phi3": "phi3", "mixtral": "llama"}
TEXTS = ["Hello world", "  two  leading spaces and\ttabs\nnewline", "digits 12345 and 3.14159",
         "unicode: naïve café, Ελληνικά, 日本語, emoji 🤖", "trailing space ", "x" * 30]
CORPUS = "\n".join(["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokens.",
                    "Numbers like 12345 and 3.14 appear in text too.", "Sentences about rivers and mountains."] * 40)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(  # Llama's settings: BPE, byte fallback, digits split, spaces kept
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")), folder


def _piece_type(sp, i: int) -> int:
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.NORMAL


def _add_vocab(writer, sp):
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_token_types([_piece_type(sp, i) for i in range(sp.get_piece_size())])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)


def _add_hparams(writer, kind, cfg):
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    if kind == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if kind == "gemma3_text":
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    if kind == "qwen3_moe":
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_weights_norm(cfg.norm_topk_prob)
    if kind == "mixtral":
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)


def _gguf_tensors(model, kind):
    """GGUF name -> float32 array, named by the gguf package's map; one [E, out, in] tensor per expert matrix."""
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == GGUF_ARCH[kind])
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    for name in [n for n in state if n.endswith(".experts.gate_up_proj")]:  # [E, 2F, D]: gate rows first
        prefix = name.removesuffix("gate_up_proj")
        state[f"{prefix}gate_proj.weight"], state[f"{prefix}up_proj.weight"] = np.split(state.pop(name), 2, axis=1)
        state[f"{prefix}down_proj.weight"] = state.pop(f"{prefix}down_proj")  # [E, D, F]
    out = {}
    for name, array in state.items():
        base, suffix = name.rsplit(".", 1) if name.endswith((".weight", ".bias")) else (name, "weight")
        target = name_map.get_name(base)
        assert target is not None, f"gguf has no name for {name}"
        if kind.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp's Gemma converter folds the +1 into the norm weights
        if GGUF_ARCH[kind] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = model.config.num_attention_heads if "q_proj" in name else model.config.num_key_value_heads
            array = _llama_cpp_rope_permute(array, heads)
        out[f"{target}.{suffix}"] = np.ascontiguousarray(array, np.float32)
    rope = model.config.rope_parameters
    if rope.get("rope_type") == "llama3":
        out["rope_freqs.weight"] = _llama3_rope_freqs(rope, model.config.head_dim)
    return out


def _llama3_rope_freqs(rope, head_dim):
    """llama.cpp's converter bakes Llama 3 rope scaling into one divisor per frequency (`rope_freqs.weight`)."""
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freqs
    low, high = (rope["original_max_position_embeddings"] / rope[k] for k in ("low_freq_factor", "high_freq_factor"))
    smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
              / (rope["high_freq_factor"] - rope["low_freq_factor"]))
    factors = np.where(wavelen < high, 1.0, np.where(wavelen > low, rope["factor"],
                                                     1.0 / ((1 - smooth) / rope["factor"] + smooth)))
    return factors.astype(np.float32)


def _llama_cpp_rope_permute(weight, heads):
    """llama.cpp's converter interleaves the two rope halves of each Q/K head for "llama" files."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(model, kind, path, sp, extra_tensors=None):
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[kind])
    _add_hparams(writer, kind, model.config)
    _add_vocab(writer, sp)
    for name, array in {**_gguf_tensors(model, kind), **(extra_tensors or {})}.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", list(GGUF_ARCH))
def test_gguf_gives_the_transformers_logits(tmp_path, spm, kind):
    sp, _ = spm
    overrides = {"vocab_size": sp.get_piece_size()}
    if kind == "phi3":  # llama.cpp stores longrope as rope_factors_* tensors, which maxjax refuses (tested below)
        overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    model = build_hf(kind, tmp_path / kind, **overrides)
    ours = load_model(write_gguf(model, kind, tmp_path / f"{kind}.gguf", sp))
    ids = [ours.tokenizer.encode_text(text, add_special_tokens=True).tolist() for text in (TEXTS[1], TEXTS[3])]
    length = min(map(len, ids))
    assert length > 8  # longer than the sliding window
    ids = [row[:length] for row in ids]
    with torch.no_grad():
        reference = model(torch.tensor(ids)).logits.numpy()
    diff = np.abs(ours.logits(ids) - reference).max()
    print(f"{kind} GGUF: max abs logit diff vs transformers {diff:.2e}")
    assert diff < 1e-5, diff


@pytest.fixture(scope="module")
def gguf_vocab_file(tmp_path_factory, spm):
    sp, _ = spm
    model = build_hf("gemma", tmp_path_factory.mktemp("gemma_vocab"), vocab_size=sp.get_piece_size())
    return write_gguf(model, "gemma", tmp_path_factory.mktemp("gguf") / "gemma.gguf", sp)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_sentencepiece_ids_equal_sentencepiece_and_transformers(spm, gguf_vocab_file, text):
    import transformers

    sp, folder = spm
    ours = HFTokenizer.from_gguf(gguf_vocab_file)
    ids = ours.encode_text(text).tolist()
    assert ids == sp.encode(text), text
    hf_ids = transformers.LlamaTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    if text.startswith(" "):  # transformers 5 merges the prepended "▁" into the text's leading space
        assert ids[1:] == hf_ids and ids[0] == sp.piece_to_id("▁"), text
    else:
        assert ids == hf_ids, text
    assert ours.encode_text(text, add_special_tokens=True).tolist() == [sp.bos_id(), *ids]
    assert ours.decode_tokens(ids) == sp.decode(ids) == text


def test_gguf_longrope_is_refused(tmp_path, spm):
    sp, _ = spm
    model = build_hf("phi3", tmp_path / "phi3", vocab_size=sp.get_piece_size())
    factors = {"rope_factors_long.weight": np.ones(8, np.float32), "rope_factors_short.weight": np.ones(8, np.float32)}
    path = write_gguf(model, "phi3", tmp_path / "phi3.gguf", sp, factors)
    with pytest.raises(ValueError, match="rope_factors_long"):
        load_model(path, tokenizer=False)


@pytest.mark.slow  # transformers' generate as the reference
def test_gguf_with_sentencepiece_vocab_generates_through_llm(tmp_path, spm):
    """The file is all you need: a Gemma 2 GGUF (sliding window, soft-capping) with a SentencePiece vocabulary
    through the `LLM` wrapper gives transformers' greedy tokens and sentencepiece's text."""
    from maxjax.interfaces import SamplingParams
    from maxjax.pipelines.llm import LLM

    sp, _ = spm
    model = build_hf("gemma2", tmp_path / "gemma2", vocab_size=sp.get_piece_size())
    llm = LLM(write_gguf(model, "gemma2", tmp_path / "gemma2.gguf", sp), chat=False, max_seq_len=64,
              length_buckets=(64,), max_batch_size=1, max_num_steps=8)
    prompt = "Numbers like 12345 and rivers, naïve 🤖"
    completion = llm.complete([prompt], SamplingParams(max_new_tokens=16, top_k=1))[0]
    ids = [sp.bos_id(), *sp.encode(prompt)]
    assert len(ids) > 8  # longer than the sliding window
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    if sp.eos_id() in expected:
        expected = expected[:expected.index(sp.eos_id()) + 1]
    assert completion.tokens == expected
    assert completion.text == sp.decode([t for t in expected if t != sp.eos_id()])
