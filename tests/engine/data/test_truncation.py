"""Truncating text before tokenising gives exactly what tokenising it whole and truncating the
tokens gives, for a byte-level tokenizer, a BPE with long merged tokens and a normaliser that
shrinks text; and a long line is never tokenised whole."""
from __future__ import annotations

import random

import pytest

from muxtune.engine.data.dataset import IGNORE, Example, encode


def reference_encode(tokenizer, prompt, completion, max_len, train_on_prompt) -> Example:
    """The untruncated path (what encode did before): tokenise both texts whole, then cut."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (bos + p + c + eos)[:max_len]
    start = len(bos) + len(p)
    targets = [ids[i + 1] if i + 1 < len(ids) and (train_on_prompt or i + 1 >= start) else IGNORE
               for i in range(len(ids))]
    return Example(tuple(ids), tuple(targets))


ALPHABET = "abcdefghij     \n\t.,!é漢字🙂"


def _text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:  # a long run of spaces: normalisers collapse it into one token
        return rng.choice("ab") + " " * rng.randint(50, 3000) + "".join(rng.choice("abc ") for _ in range(rng.randint(0, 40)))
    if kind < 0.3:  # one long word (a single pre-token)
        return "ab" * rng.randint(10, 800)
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, rng.choice([10, 200, 2000]))))


def _trained_bpe(normalise: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(7)
    corpus = [_text(rng) for _ in range(300)] + ["ab" * 50, "abab abab abab", "the quick brown fox"] * 20
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    if normalise:  # SentencePiece-like: runs of whitespace shrink to one space
        tok.normalizer = normalizers.Replace(Regex(r"\s+"), " ")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=64)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizers(tiny_backbone_dir):
    from transformers import AutoTokenizer

    return {"byte-level": AutoTokenizer.from_pretrained(tiny_backbone_dir),
            "bpe-merges": _trained_bpe(normalise=False),
            "bpe-shrinking-normaliser": _trained_bpe(normalise=True)}


@pytest.mark.parametrize("name", ["byte-level", "bpe-merges", "bpe-shrinking-normaliser"])
def test_truncated_encoding_equals_untruncated(name, tokenizers):
    tok = tokenizers[name]
    rng = random.Random(hash(name) % 1000)
    cut = 0
    for _ in range(120):  # bounded: 120 random examples per tokenizer
        prompt, completion = _text(rng), _text(rng)
        max_len = rng.choice([1, 2, 3, 8, 48, 200])
        train_on_prompt = rng.random() < 0.3
        got = encode(tok, prompt, completion, max_len, train_on_prompt)
        want = reference_encode(tok, prompt, completion, max_len, train_on_prompt)
        assert got == want, (name, max_len, prompt[:60], completion[:60])
        cut += len(tok(prompt + completion, add_special_tokens=False)["input_ids"]) > max_len
    assert cut > 30, "the cases must exercise truncation"


def test_long_line_is_not_tokenised_whole(tokenizers):
    """A 400 kB completion with maxSeqLen 48: the tokenizer only ever sees a bounded prefix."""
    tok = tokenizers["byte-level"]
    seen = []
    real_call = type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **k):
            seen.append(len(text))
            return real_call(self, text, *a, **k)

    spy = tok.__class__.__new__(Spy)
    spy.__dict__.update(tok.__dict__)
    completion = "xy" * 200_000
    got = encode(spy, "prompt: ", completion, 48, False)
    assert got == reference_encode(tok, "prompt: ", completion, 48, False)
    assert seen and max(seen) < 10_000, f"tokenised {max(seen)} characters for 48 tokens"
