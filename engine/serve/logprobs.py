"""Log-probabilities as the model computes them: log_softmax of the adapter's own raw logits in
fp32 (before penalties, temperature or truncation, as vLLM reports them by default), for a
generated token (with its top alternatives) and for every prompt token after the first (echo with
logprobs: how a loglikelihood is scored). The engine thread computes ids and floats; the HTTP side
renders them in the completions or chat shape (token strings are decoded there)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # OpenAI's limit on top alternatives


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None: the prompt's first token, which nothing predicts
    top: list[tuple[int, float]]  # the k most likely tokens, most likely first


def entries(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """logits [n, vocab] (row i predicts tokens[i]) -> one entry per row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = lp.topk(min(k, lp.shape[1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def completion_logprobs(decode, entries_: list[TokenLogprob], text_start: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset. The first
    prompt token of an echo has no logprob (None), as in OpenAI's and vLLM's; top_logprobs holds the
    chosen token beside the k alternatives."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_start
    for e in entries_:
        text = decode(e.token)
        top = None
        if e.logprob is not None:
            top = {decode(t): v for t, v in e.top}
            top.setdefault(text, e.logprob)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(decode_bytes, generated: list[TokenLogprob]) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def one(token: int, logprob: float) -> dict:
        raw = decode_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]}
                        for e in generated]}
