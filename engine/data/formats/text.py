"""Plain language modelling: every token is a target; a long document becomes consecutive
maxSeqLen-token sequences (the last one shorter), each a sequence of its own."""
from __future__ import annotations

from muxtune.engine.data.examples import IGNORE, Example, RowError

MAX_PIECES = 4096  # sequences one document may become (a 16 MiB line at 512 tokens is far fewer)


def encode_text(tokenizer, text: str, max_len: int) -> list[Example]:
    if not isinstance(text, str):
        raise RowError("the text field must be a string")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    out = []
    for start in range(0, len(ids), max_len):
        piece = ids[start: start + max_len]
        if len(piece) < 2 or len(out) >= MAX_PIECES:
            break
        out.append(Example(tuple(piece), tuple(piece[1:]) + (IGNORE,)))
    return out
