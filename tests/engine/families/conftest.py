"""One tiny checkpoint per family for the whole session, and the user's way of scoring an adapter."""
from __future__ import annotations

import json

import pytest
import torch

from .checkpoints import save_family_checkpoint


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    cache: dict = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = save_family_checkpoint(model_type, tmp_path_factory.mktemp(model_type))
        return cache[model_type]

    return get


def peft_loss(adapter_dir, examples) -> float:
    """Mean validation token loss computed the user's way: the base model from the adapter's own
    config, PeftModel.from_pretrained, each example alone, the model's stock (eager) attention."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers.models import examples_loss

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32,
                                                attn_implementation="eager")
    return examples_loss(PeftModel.from_pretrained(base, adapter_dir).eval(), examples)
