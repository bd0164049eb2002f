"""Models with random weights of a real shape, for measuring without downloading.

``--model ID=random:SHAPE[@TOKENIZER_DIR]`` serves a model whose compute per
token is a real model's and whose text is nonsense (vLLM's ``--load-format
dummy``). SHAPE is a name below or a ``config.json`` (or a folder holding one);
the tokenizer is the embedded SmolLM2's unless a folder with tokenizer files is
given, and the named shapes take their vocabulary, special tokens and norms
from it (the tokenizer folder's ``config.json`` where it has one).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from llm_stream.errors import ModelLoadError
from llm_stream.model.support import attention_implementation

# Overrides of the base (SmolLM2-135M's) config: Llama-3.2-1B's and Llama-3-8B's shapes,
# on the tokenizer's vocabulary.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {},
    # Two small layers: a whole replica in a few MB and milliseconds a token on a CPU,
    # for exercising deployments (replicas behind Envoy, restarts, kills) rather than
    # measuring a model.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    },
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    },
}

# Small weights keep the logits finite and the sampled text varied.
_INIT_STD = 0.02
_SEED = 0
_DROPPED_KEYS = ("architectures", "transformers_version", "_model_name_or_path", "dtype")


def check_shape(shape: str) -> None:
    """ModelLoadError unless ``shape`` names a known shape or an existing config."""
    if shape in SHAPES:
        return
    path = Path(shape).expanduser()
    if path.is_file() or (path / "config.json").is_file():
        return
    raise ModelLoadError(
        f"random weights: {shape!r} is neither a known shape ({', '.join(SHAPES)}) "
        "nor a config.json or a folder holding one"
    )


def _config(shape: str, tokenizer_dir: Path, tokenizer: Any) -> Any:
    if shape not in SHAPES:
        path = Path(shape).expanduser()
        return AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    base_file = tokenizer_dir / "config.json"
    base: dict[str, Any] = json.loads(base_file.read_text()) if base_file.is_file() else {}
    base = {k: v for k, v in base.items() if k not in _DROPPED_KEYS}
    base.setdefault("model_type", "llama")
    base["vocab_size"] = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            base[name] = value
    base.update(SHAPES[shape])
    model_type = base.pop("model_type")
    config = AutoConfig.for_model(model_type, **base)
    config.architectures = ["LlamaForCausalLM"] if model_type == "llama" else None
    return config


def random_model(
    shape: str, tokenizer_dir: Path, dtype: torch.dtype, device: torch.device
) -> tuple[Any, Any, str]:
    """(model, tokenizer, version) with seeded random weights, built on ``device``."""
    check_shape(shape)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = _config(shape, tokenizer_dir, tokenizer)
    torch.manual_seed(_SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attention_implementation(config)
        )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, _INIT_STD)
    if (tokenizer_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(tokenizer_dir))
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return model, tokenizer, f"random-seed{_SEED}-{digest}"
