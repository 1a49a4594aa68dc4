"""LoRA (Hu et al., 2021), and with ``useDora`` DoRA (Liu et al., 2024): y += (alpha / r) * B A x on the
task's own tokens; DoRA adds a trained magnitude per output feature. Torch: engine/peft/lora.py, dora.py."""
from __future__ import annotations

from typing import Iterator

from muxtune.facts.methods.base import Linear, PeftMethodDecl, split
from muxtune.facts.methods.registry import register_peft_method

FP32 = 4


@register_peft_method
class LoraDecl(PeftMethodDecl):
    name = "lora"
    title = "LoRA"
    flags = ("use_dora",)
    peft_type = "LORA"

    @staticmethod
    def peft_config(spec, base_model_path: str):
        from peft import LoraConfig

        return LoraConfig(
            r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
            target_modules=sorted(spec.target_modules), task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_path, bias="none", use_dora=spec.use_dora,
        )

    @staticmethod
    def unsupported_peft_features(cfg: dict) -> Iterator[str]:
        if cfg.get("bias", "none") != "none":
            yield f"bias={cfg.get('bias')!r}"
        # fan_in_fan_out (GPT-2-style Conv1D bases) only orients the base weight: PEFT's lora_A/lora_B are
        # Linears either way, and the engine runs Conv1D as Linear views (engine/model/families.py)
        yield from (flag for flag in ("use_dora", "use_rslora") if cfg.get(flag))
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            yield "rank_pattern/alpha_pattern"

    @staticmethod
    def spec_fields(cfg: dict) -> dict:
        return dict(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0, target_modules=cfg["target_modules"])

    @staticmethod
    def linear_params(shape, m: Linear, tp: int = 1) -> int:
        """A is r x d_in, B is d_out x r; under tp a row-parallel Linear splits A, a column-parallel
        one B. DoRA's magnitude adds d_out (DoRA does not run under tp)."""
        tp = tp if m.per_layer else 1
        lora = shape.r * (split(m.d_in, tp, m.row_parallel) + split(m.d_out, tp, not m.row_parallel))
        return lora + (m.d_out if getattr(shape, "use_dora", False) else 0)

    @staticmethod
    def keeps_input(shape, target: str) -> bool:
        return True

    @staticmethod
    def own_saved(shape, m: Linear) -> int:
        """The rank-r intermediate (fp32 in the fused kernel)."""
        return shape.r * FP32
