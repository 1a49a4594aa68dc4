"""Next-token choice per request: greedy at temperature 0, else temperature + nucleus (top_p)
sampling from the request's own seeded generator, so a seeded request gives the same text
whatever else shares its batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing by them overflows)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def new_generator(params: SamplingParams, device: torch.device, fallback_seed: int) -> torch.Generator | None:
    if params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed if params.seed is not None else fallback_seed)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [n, vocab] float32; one token id per row."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    for i in rows:
        p = params[i]
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = (sorted_p.cumsum(0) - sorted_p) >= p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_p, 1, generator=generators[i])
            out[i] = idx[choice[0]]
        else:
            out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out.tolist()
