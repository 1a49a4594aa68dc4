"""Which decoder layers each pipeline stage runs, balanced by compute.

Cost is multiply-accumulates per token: a decoder layer's Linear weights plus its attention
(QK^T and PV over a nominal context), the first stage's embedding lookup (hidden size: a gather),
the last stage's norm and LM head (vocab x hidden). Contiguous layer ranges minimise the costliest
stage (exact dynamic programme; ties go to the split that puts layers earlier).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from muxtune.partition import contiguous_bounds

NOMINAL_CONTEXT = 256  # context positions a token attends over, for the attention term


@dataclass(frozen=True)
class StagePlan:
    index: int
    start: int  # first decoder layer
    end: int  # one past the last
    cost: float

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


def layer_costs(model: nn.Module) -> tuple[float, list[float], float]:
    """(embedding cost, per-layer costs, head cost) of a causal LM, in MACs per token."""
    from muxtune.engine.model.families import decoder_layers

    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attention = 2 * heads * head_dim * NOMINAL_CONTEXT
    layers = [float(sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear)) + attention)
              for layer in decoder_layers(model)]
    head = model.get_output_embeddings()
    return float(cfg.hidden_size), layers, float(head.weight.numel() + cfg.hidden_size)


def split_layers(embed: float, layers: list[float], head: float, stages: int) -> list[StagePlan]:
    """Contiguous ranges of layers, one per stage, minimising the costliest stage."""
    n = len(layers)
    if stages > n:
        raise ValueError(f"--pp {stages}: the backbone has only {n} decoder layers to split")
    bounds = contiguous_bounds(embed, layers, head, stages)
    last = len(bounds) - 1
    return [StagePlan(s, a, b, sum(layers[a:b]) + (embed if s == 0 else 0.0) + (head if s == last else 0.0))
            for s, (a, b) in enumerate(bounds)]


def describe(plans: list[StagePlan]) -> str:
    total = sum(p.cost for p in plans)
    parts = []
    for p in plans:
        what = []
        if p.index == 0:
            what.append("embed")
        what.append(f"layers {p.start}-{p.end - 1}" if p.end - p.start > 1 else f"layer {p.start}")
        if p.index == len(plans) - 1:
            what.append("norm+head+loss")
        parts.append(f"stage {p.index}: {' + '.join(what)} ({100 * p.cost / total:.1f}% of the compute)")
    return f"pipeline split over {len(plans)} stages: " + "; ".join(parts)
