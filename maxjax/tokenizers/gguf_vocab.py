"""Build a ``tokenizers`` tokenizer from the vocabulary stored in a GGUF file: byte-level BPE (``gpt2``) or
SentencePiece BPE with byte fallback (``llama``, see ``gguf_spm``)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .gguf_spm import sentencepiece_tokenizer

# Control (3) tokens are added as special tokens, user-defined (4) as plain added tokens.
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":  # SmolLM's tokenizer.json: digits one by one, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt2"):
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to maxjax; using GPT-2's byte-level split",
                      stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@dataclass
class GGUFTokenizerSpec:
    """What a GGUF file says about its tokenizer, ready for ``HFTokenizer``."""

    tokenizer: Tokenizer
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool
    chat_template: str | None
    context_length: int | None
    tokens: list[str]


def _fields(reader: Any) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()
            if name.startswith("tokenizer.") or name == "general.architecture" or name.endswith(".context_length")}


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # A token outside the byte alphabet is stored as raw text; respell it in bytes, as the merges are.
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= spelled])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])
    return tk


def read_gguf_tokenizer(source: str | os.PathLike | Any) -> GGUFTokenizerSpec:
    """Read the tokenizer of a GGUF file (a path or an open ``gguf.GGUFReader``)."""
    if isinstance(source, (str, os.PathLike)):
        import gguf  # only needed for GGUF files

        source = gguf.GGUFReader(os.fspath(source))
    meta = _fields(source)
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: byte-level BPE 'gpt2', "
                         "SentencePiece 'llama'); load the model's tokenizer.json or tokenizer.model directory instead")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
        tk = sentencepiece_tokenizer(tokens, scores, types, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    else:
        tk = _byte_level_bpe(meta, tokens, types)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B:1", special_tokens=[(tokens[bos], int(bos))])
    eos_ids = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    arch = meta.get("general.architecture")
    ctx_len = meta.get(f"{arch}.context_length")
    return GGUFTokenizerSpec(tokenizer=tk, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                             add_bos_token=add_bos, chat_template=meta.get("tokenizer.chat_template"),
                             context_length=None if ctx_len is None else int(ctx_len), tokens=tokens)
