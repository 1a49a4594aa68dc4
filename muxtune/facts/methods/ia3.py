"""IA3 (Liu et al., 2022): a learned rescaling of a Linear's output, or of its input for the
feed-forward modules. Torch: engine/peft/ia3.py."""
from __future__ import annotations

from muxtune.facts.methods.base import Linear, PeftMethodDecl, split
from muxtune.facts.methods.registry import register_peft_method


@register_peft_method
class Ia3Decl(PeftMethodDecl):
    name = "ia3"
    title = "IA3"
    peft_type = "IA3"

    @staticmethod
    def peft_config(spec, base_model_path: str):
        from peft import IA3Config

        return IA3Config(
            target_modules=sorted(spec.target_modules),
            feedforward_modules=sorted(spec.feedforward_modules),
            task_type="CAUSAL_LM", base_model_name_or_path=base_model_path,
        )

    @staticmethod
    def spec_fields(cfg: dict) -> dict:
        return dict(target_modules=cfg["target_modules"], feedforward_modules=cfg.get("feedforward_modules") or [])

    @staticmethod
    def scaled_width(feedforward: bool, m: Linear) -> tuple[int, bool]:
        """(width of the scale, whether it lies along the split features): the input for a
        feed-forward module, else the output."""
        return (m.d_in, m.row_parallel) if feedforward else (m.d_out, not m.row_parallel)

    @staticmethod
    def linear_params(shape, m: Linear, tp: int = 1) -> int:
        width, along = Ia3Decl.scaled_width(m.name in shape.feedforward_modules, m)
        return split(width, tp, along and m.per_layer)

    @staticmethod
    def keeps_input(shape, target: str) -> bool:
        return target in shape.feedforward_modules  # an input scale needs the input for its gradient

    @staticmethod
    def saved_outputs(shape, target: str, m: Linear, dtype_bytes: int, tp: int) -> dict[str, float]:
        """The scaled tensor and its per-token scales (other tasks' tokens are scaled by one)."""
        ff = target in shape.feedforward_modules
        width, along = Ia3Decl.scaled_width(ff, m)
        key = ("scales " if ff else "scaled output and scales ") + m.name
        return {key: (1 if ff else 2) * width * dtype_bytes / (tp if along else 1)}
