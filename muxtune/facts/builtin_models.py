"""The built-in test backbones (``baseModel: builtin:NAME``): the engine generates them from these
configs (engine/model/loading.py) and the operator sizes them from the same figures, without torch.
"""
from __future__ import annotations

from muxtune.api.basemodel import Architecture

# Small Llama-architecture configs. tiny-llama drives the quickstart and tests;
# small-llama is large enough on CPU for the benchmark to show where time goes.
# initializer_range 0.1 (not Llama's 0.02): a frozen random lm_head after RMSNorm at 0.02 caps
# the logit range near 2.6, so no adapter could lower the loss much; at 0.1 losses fall visibly.
BUILTIN_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       initializer_range=0.1),
    "small-llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                        initializer_range=0.1),
}
BYTE_VOCAB = 256 + 3  # the engine's byte-level tokenizer: 256 byte tokens and <pad>, <s>, </s>
BUILTIN_DTYPE = "bfloat16"


def llama_parameters(cfg: dict, vocab: int) -> int:
    """Parameters of an untied, bias-free Llama of config ``cfg``: embedding and LM head, per layer
    the four attention projections (k/v narrowed by grouped-query attention), the gated MLP and two
    RMSNorms, and the final norm."""
    h, ffn, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h
    return 2 * vocab * h + layers * per_layer + h


def _architecture(cfg: dict) -> Architecture:
    return Architecture(
        parameters=llama_parameters(cfg, BYTE_VOCAB), layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"], vocab_size=BYTE_VOCAB, dtype=BUILTIN_DTYPE, model_type="llama",
    )


BUILTIN_ARCHITECTURES: dict[str, Architecture] = {name: _architecture(cfg) for name, cfg in BUILTIN_CONFIGS.items()}
