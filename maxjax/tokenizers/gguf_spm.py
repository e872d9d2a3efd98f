"""A ``tokenizers`` BPE with byte fallback from a GGUF SentencePiece vocabulary (``tokenizer.ggml.model == "llama"``).

llama.cpp stores a SentencePiece BPE model as pieces, scores and piece types, without merges. SentencePiece's
BPE repeatedly joins the adjacent pair whose joined piece has the highest score; a BPE whose merges are
every (left, right) split of each normal piece, ranked by that piece's score, makes the same choices. Text is
normalized as SentencePiece does for these models: spaces become "▁" and, with ``add_space_prefix``, one "▁"
is prepended. Characters outside the vocabulary become their UTF-8 bytes' ``<0xXX>`` pieces.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

# SentencePiece piece types as GGUF stores them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"


def bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of each normal piece into two vocabulary pieces, highest-scoring joined piece first."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, i in ids.items():
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer(tokens: list[str], scores: list[float], types: list[int],
                            add_space_prefix: bool = True) -> Tokenizer:
    """The tokenizer of a GGUF SentencePiece vocabulary (see the module docstring)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    unknown = next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(tokens, scores, types), unk_token=unknown,
                              fuse_unk=True, byte_fallback=True))
    steps = ([normalizers.Prepend(SPACE)] if add_space_prefix else []) + [normalizers.Replace(" ", SPACE)]
    tk.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(decode + ([decoders.Strip(content=" ", left=1)] if add_space_prefix else []))
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tk
