"""Backbone loading: built-in test models and user checkpoints take the same from_pretrained path.

A built-in model is generated once from a config with a fixed seed, saved with save_pretrained
under the muxtune cache, and from then on loaded like any Hugging Face model directory.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from muxtune.engine.model import quantize
from muxtune.facts.quantization import NO_QUANTIZATION
from muxtune.storage import models
from muxtune.storage.cache import cached_dir
from muxtune.facts.builtin_models import BUILTIN_CONFIGS  # declared torch-free: the operator sizes them too

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
log = logging.getLogger("muxtune.engine")


class ModelLoadError(RuntimeError):
    """The backbone cannot be loaded: every task on it fails with this reason (which names the file)."""


@dataclass
class LoadedBackbone:
    model: torch.nn.Module
    tokenizer: object
    path: Path  # the directory from_pretrained read: what adapters name as their base
    trust_remote_code: bool = False  # the model's own Python files were allowed to run
    quantization: str = NO_QUANTIZATION  # the decoder Linears' storage (engine/model/quantize.py)


def _byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 3 specials) that needs no hub download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def generated_model(name: str, spec: dict, build: Callable[[Path], None]) -> Path:
    """`<cache>/models/<name>-<hash(spec)>`, made once by build(directory) (muxtune/storage/cache.py:
    locked and atomic, so concurrent first runs share one copy and a changed spec never reuses a
    stale one)."""
    try:
        return cached_dir("models", name, spec, build, "config.json", short=True)
    except RuntimeError as exc:
        # transformers' save_pretrained writes nothing on a non-zero torch.distributed rank
        raise RuntimeError(f"{exc} (built on a non-zero distributed rank? resolve built-in models "
                           "before torch.distributed starts)") from None


def builtin_path(name: str) -> Path:
    """Directory of a built-in model, generated with a fixed seed and saved on first use."""
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_CONFIGS))}")

    def build(directory: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = _byte_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, **BUILTIN_CONFIGS[name],
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return generated_model(name, BUILTIN_CONFIGS[name], build)


def resolve_base_model(base_model: str, search_dir: Path | None = None) -> Path:
    """Map a FineTuneTask.spec.baseModel to a local model directory."""
    if base_model.startswith("builtin:"):
        return builtin_path(base_model.removeprefix("builtin:"))
    if models.is_remote_model(base_model):
        return models.fetch_model(base_model)
    if base_model.startswith(("model:", "pvc://")):
        raise ValueError(
            f"baseModel {base_model!r} names cluster storage; the operator rewrites it to the "
            "mounted path before the engine starts"
        )
    path = Path(base_model)
    if not path.is_absolute() and search_dir is not None and not path.exists():
        path = search_dir / path
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"baseModel {base_model!r}: no config.json in {path}")
    return path.resolve()


def check_weights(path: Path) -> None:
    """Weights present, and every safetensors file's header whole and covering the file, before
    from_pretrained (whose errors do not name the file, or come as a bare Rust panic)."""
    from safetensors import safe_open

    shards = sorted(Path(path).glob("*.safetensors"))
    if not shards and not any((Path(path) / f).exists() for f in WEIGHT_FILES):
        raise ModelLoadError(f"{path}: no weights ({', '.join(WEIGHT_FILES)} or *.safetensors shards)")
    for f in shards:
        try:
            with safe_open(f, "pt") as h:
                h.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: all say "corrupt"
            raise ModelLoadError(f"{f}: not a readable safetensors file: {exc}") from None


def check_remote_code(path: Path, trust_remote_code: bool = False) -> None:
    """A model directory whose config.json (or tokenizer_config.json) maps classes to its own Python
    files (auto_map) would run them on load: refused, in one line, unless its user has the right
    to allow it (`--trust-remote-code` locally, spec.trustRemoteCode on a cluster BaseModel)."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelLoadError(
                f"{path}: {name} asks to run Python code from the model directory (auto_map); refused "
                "(allow it with --trust-remote-code, or spec.trustRemoteCode on the cluster's BaseModel)")


def load_backbone(path: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False,
                  quantization: str = NO_QUANTIZATION) -> LoadedBackbone:
    """Load a frozen backbone through the ordinary Hugging Face path (quantized by bitsandbytes
    when asked); any failure is a ModelLoadError naming the directory or file, so the caller can
    fail this backbone's tasks alone."""
    check_remote_code(path, trust_remote_code)
    check_weights(path)
    try:
        loaded = _load(path, device, dtype, trust_remote_code, quantization)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "this backbone"
        raise ModelLoadError(f"{path}: cannot load the model: {type(exc).__name__}: {exc}") from None
    if loaded.tokenizer.eos_token_id is None:
        log.warning("the tokenizer has no EOS token: examples end without one, so the adapters never learn "
                    "to stop", extra={"model": str(path)})
    return loaded


def _load(path: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool,
          quantization: str = NO_QUANTIZATION) -> LoadedBackbone:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # eager: every family supports it (Gemma 2 refuses sdpa); the engine installs its own packed
    # attention right after (engine/model/attention.py), and the fidelity probe's reference is eager
    common = dict(dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code,
                  **quantize.load_kwargs(quantization, device, dtype))
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        # the pod was given several GPUs (tp*pp by the planner's memory model): spread the layers
        # over all of them, pipeline-style, so the backbone fits; one batch flows through in turn
        model = AutoModelForCausalLM.from_pretrained(path, **{**common, "device_map": "auto"})
    elif quantization != NO_QUANTIZATION:  # placed (and quantized) by its device map
        model = AutoModelForCausalLM.from_pretrained(path, **common)
        quantize.one_weight_format(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **common)
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedBackbone(model=model, tokenizer=tokenizer, path=Path(path), trust_remote_code=trust_remote_code,
                          quantization=quantization)
