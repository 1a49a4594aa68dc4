"""Prompt tuning (Lester et al., 2021): trained virtual-token embeddings prepended to each of a task's
sequences. Torch: engine/peft/prompt_tuning.py."""
from __future__ import annotations

from muxtune.facts.methods.base import PeftMethodDecl
from muxtune.facts.methods.registry import register_peft_method


@register_peft_method
class PromptTuningDecl(PeftMethodDecl):
    name = "prompt_tuning"
    title = "prompt tuning"
    attaches = "input"
    requires = ("num_virtual_tokens",)
    owns = ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text")
    peft_type = "PROMPT_TUNING"

    @staticmethod
    def peft_config(spec, base_model_path: str):
        from peft import PromptTuningConfig
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base_model_path, trust_remote_code=False)  # the backbone's own shape, as PEFT records it
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens,
            token_dim=cfg.hidden_size, num_transformer_submodules=1,
            num_attention_heads=getattr(cfg, "num_attention_heads", None),
            num_layers=getattr(cfg, "num_hidden_layers", None),
            prompt_tuning_init=spec.prompt_tuning_init or "RANDOM",
            prompt_tuning_init_text=spec.prompt_tuning_init_text,
            tokenizer_name_or_path=base_model_path if spec.prompt_tuning_init == "TEXT" else None,
            base_model_name_or_path=base_model_path,
        )

    @staticmethod
    def unsupported_peft_features(cfg: dict):
        if cfg.get("task_type") not in (None, "CAUSAL_LM"):
            yield f"task_type {cfg.get('task_type')!r} (CAUSAL_LM is served)"
        if (cfg.get("num_transformer_submodules") or 1) != 1:
            yield "num_transformer_submodules other than 1"

    @staticmethod
    def spec_fields(cfg: dict) -> dict:
        """The prompt's weights come from the directory, so its initialisation is not needed."""
        return dict(num_virtual_tokens=cfg["num_virtual_tokens"])

    @classmethod
    def virtual_tokens(cls, spec) -> int:
        return spec.num_virtual_tokens or 0

    @staticmethod
    def input_params(shape, hidden_size: int) -> int:
        """numVirtualTokens x hidden: one embedding row per virtual token."""
        return max(shape.num_virtual_tokens, 1) * hidden_size
