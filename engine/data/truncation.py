"""Tokenise only as much text as maxSeqLen can keep, so a 200 MB line costs what a short one does.

Why the character bound is safe. Let L be the longest token of the vocabulary in characters
(special and added tokens included; byte-level vocabularies spell a byte as one character, so L
over-counts there). The first n tokens of a text then cover at most n * L characters, so cutting
the text at (n + SLACK) * L characters leaves those n tokens and SLACK more behind them. A
tokenizer's choice for a token depends only on text close to it (a pre-tokenizer's look-ahead, a
BPE word's neighbouring symbols), which the SLACK tokens after the n kept ones cover.

A normaliser can shrink text (collapsing runs of spaces, dropping combining marks), breaking
"n tokens cover at most n * L characters". So the cut is also checked: the prefix must yield at
least n + SLACK tokens, or the bound is doubled and the prefix tokenised again, up to the whole
text (at most twice the work of tokenising it whole). In particular a text whose tokens fit
(fewer than n + SLACK) is always tokenised whole: truncation never changes a sequence that fits.
"""
from __future__ import annotations

import weakref

SLACK_TOKENS = 16
_max_chars: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int:
    """The longest vocabulary entry, in characters (computed once per tokenizer)."""
    try:
        return _max_chars[tokenizer]
    except (KeyError, TypeError):
        pass
    entries = list(tokenizer.get_vocab())
    entries += [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]
    longest = max((len(t) for t in entries), default=1)
    try:
        _max_chars[tokenizer] = max(1, longest)
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return max(1, longest)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_prefix(tokenizer, text: str, n: int) -> list[int]:
    """The first n tokens of the text's tokenisation, tokenising a bounded prefix of it."""
    if n <= 0:
        return []
    limit = (n + SLACK_TOKENS) * max_token_chars(tokenizer)
    while len(text) > limit:
        ids = _ids(tokenizer, text[:limit])
        if len(ids) >= n + SLACK_TOKENS:
            return ids[:n]
        limit *= 2
    return _ids(tokenizer, text)[:n]
