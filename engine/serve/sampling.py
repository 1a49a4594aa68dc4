"""Next-token choice per request, as transformers' logits processors make it: logit_bias, then the
penalties (repetition over prompt and output, as RepetitionPenaltyLogitsProcessor; presence and
frequency over the output, OpenAI's and vLLM's formula), min_tokens (MinNewTokensLengthLogitsProcessor:
EOS and stop_token_ids masked until then), then greedy at temperature 0, else temperature, top-k and
nucleus (top_p) sampling from the request's own seeded generator, so a seeded request gives the same
text whatever else shares its batch. Logprobs are not taken from here: they are the model's own
(raw logits, fp32), as vLLM reports them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # top alternatives per generated token (0: the chosen token's only)
    prompt_logprobs: int | None = None  # the same for every prompt token (echo with logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processed(self) -> bool:
        """Whether the raw logits need processing before the choice."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias)


def new_generator(params: SamplingParams, device: torch.device, fallback_seed: int) -> torch.Generator | None:
    if params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed if params.seed is not None else fallback_seed)


def process(scores: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int],
            eos: int | None) -> torch.Tensor:
    """One row of logits [vocab] (float32) after bias, penalties and min_tokens; a new tensor."""
    scores = scores.clone()
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias)
        scores[list(ids)] += torch.tensor(bias, dtype=scores.dtype, device=scores.device)
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=scores.device)
        s = scores[seen]
        scores[seen] = torch.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output_ids:
        ids = torch.tensor(output_ids, dtype=torch.long, device=scores.device)
        counts = torch.zeros_like(scores).index_add_(0, ids, torch.ones_like(ids, dtype=scores.dtype))
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores.dtype)
    if len(output_ids) < p.min_tokens:
        banned = list(p.stop_token_ids) + ([eos] if eos is not None and not p.ignore_eos else [])
        if banned:
            scores[banned] = -float("inf")
    return scores


def choose(scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from processed logits [vocab]: argmax, or a sample after temperature, top-k, top-p."""
    if p.greedy:
        return int(scores.argmax())
    scores = scores / p.temperature
    if 0 < p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        return int(idx[torch.multinomial(sorted_p, 1, generator=generator)[0]])
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           history: list[tuple[list[int], list[int]]] | None = None, eos: int | None = None) -> list[int]:
    """logits [n, vocab] float32; one token id per row. history: (prompt ids, output ids) per row,
    needed by the penalties and min_tokens."""
    out = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy and not p.processed:
            continue
        row = process(logits[i], p, *history[i], eos) if p.processed else logits[i]
        out[i] = choose(row, p, generators[i])
    return out
