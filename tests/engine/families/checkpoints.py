"""Tiny random checkpoints, one per family of engine/model/families.py, built from transformers'
own config classes and saved with save_pretrained (as a user's model directory is), with the
engine's byte-level tokenizer (vocab 259: pad 0, bos 1, eos 2).

Every windowed family gets a window of WINDOW tokens, shorter than the test sequences, so the
windows really cut; logits are scaled up (initializer_range 0.2) so training moves the loss."""
from __future__ import annotations

from pathlib import Path

WINDOW = 8
_TOKENS = dict(vocab_size=259, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **_TOKENS)

# model_type -> (config class in transformers, its arguments)
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_SMALL, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": ("Qwen2Config", dict(_SMALL, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=8)),
    "mistral": ("MistralConfig", dict(_SMALL, sliding_window=WINDOW)),
    "gemma": ("GemmaConfig", dict(_SMALL, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(_SMALL, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(_SMALL, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                             layer_types=["sliding_attention", "full_attention"],
                                             rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                                 "rope_theta": 10000.0},
                                                              "sliding_attention": {"rope_type": "default",
                                                                                    "rope_theta": 1000.0}})),
    "phi3": ("Phi3Config", dict(_SMALL, sliding_window=WINDOW)),
    "granite": ("GraniteConfig", dict(_SMALL, embedding_multiplier=6.0, residual_multiplier=0.5,
                                      attention_multiplier=0.3, logits_scaling=0.5)),
    "olmo2": ("Olmo2Config", dict(_SMALL)),
    "smollm3": ("SmolLM3Config", dict(_SMALL, no_rope_layers=[1, 0])),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2,
                                **_TOKENS)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=16, max_position_embeddings=256, init_std=0.2, **_TOKENS)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True,
                                       max_position_embeddings=256, initializer_range=0.2, **_TOKENS)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_SMALL, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16)),
}


def save_family_checkpoint(model_type: str, path: Path, seed: int = 3) -> Path:
    """The family's tiny model and the byte tokenizer under path (created)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from muxtune.engine.model.loading import _byte_tokenizer

    cls_name, kwargs = CONFIGS[model_type]
    config = getattr(transformers, cls_name)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return Path(path)
