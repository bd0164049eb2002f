"""Tiny random-weight models of every decoder-only family the server claims to serve.

Each is built from the family's own config class in well under a second: four
layers where the family mixes attention kinds (so both kinds appear), a 16-token
sliding window where it has one, and weights drawn wide enough that greedy
logits are mostly peaked (few fp32 near-ties between the batch and the model
alone; tests/test_model_families.py allows a parting at one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers import models as hf

WINDOW = 16
# Alternating kinds, as Gemma 2, Cohere 2, gpt-oss and OLMo 3 configure them.
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
_INIT_STD = 0.15


def _common(vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        **ids,
    }


def _moe(**extra: Any) -> dict[str, Any]:
    return {"num_experts_per_tok": 2, **extra}


# family -> (what it stands for, how its config is made from the common fields)
FAMILIES: dict[str, tuple[str, Callable[[dict[str, Any]], PretrainedConfig]]] = {
    "llama": ("Llama 2/3, SmolLM2", lambda c: hf.llama.LlamaConfig(**c)),
    "qwen2": ("Qwen2, Qwen2.5", lambda c: hf.qwen2.Qwen2Config(**c)),
    "qwen2-window": (
        "Qwen2 with its sliding window on (windowed from layer 2)",
        lambda c: hf.qwen2.Qwen2Config(
            **c, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2
        ),
    ),
    "qwen3": ("Qwen3", lambda c: hf.qwen3.Qwen3Config(**c, head_dim=16)),
    "qwen3-moe": (
        "Qwen3-MoE",
        lambda c: hf.qwen3_moe.Qwen3MoeConfig(
            **c, head_dim=16, **_moe(num_experts=4, moe_intermediate_size=32)
        ),
    ),
    "mistral-window": (
        "Mistral 7B v0.1 (every layer windowed)",
        lambda c: hf.mistral.MistralConfig(**c, sliding_window=WINDOW),
    ),
    "ministral": (
        "Ministral (alternating window and full)",
        lambda c: hf.ministral.MinistralConfig(
            **c, head_dim=16, sliding_window=WINDOW, layer_types=HYBRID
        ),
    ),
    "mixtral": (
        "Mixtral",
        lambda c: hf.mixtral.MixtralConfig(**c, **_moe(num_local_experts=4)),
    ),
    "gemma2": (
        "Gemma 2",
        lambda c: hf.gemma2.Gemma2Config(
            **c, head_dim=16, sliding_window=WINDOW, layer_types=HYBRID, query_pre_attn_scalar=16
        ),
    ),
    "gemma3": (
        "Gemma 3 (text)",
        lambda c: hf.gemma3.Gemma3TextConfig(
            **c, head_dim=16, sliding_window=WINDOW, layer_types=HYBRID, query_pre_attn_scalar=16
        ),
    ),
    "phi3-window": (
        "Phi-3 (windowed), Phi-3.5-mini",
        lambda c: hf.phi3.Phi3Config(**c, sliding_window=WINDOW),
    ),
    "phi4": (
        "Phi-4, Phi-4-mini (Phi-3 architecture, full attention)",
        lambda c: hf.phi3.Phi3Config(**c),
    ),
    "cohere2": (
        "Cohere 2 (Command R7B)",
        lambda c: hf.cohere2.Cohere2Config(**c, sliding_window=WINDOW, layer_types=HYBRID),
    ),
    "gpt-oss": (
        "gpt-oss (attention sinks, MoE)",
        lambda c: hf.gpt_oss.GptOssConfig(
            **{**c, "intermediate_size": 64},
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=HYBRID,
            **_moe(num_local_experts=4),
        ),
    ),
    "olmo2": ("OLMo 2", lambda c: hf.olmo2.Olmo2Config(**c)),
    "olmo3": (
        "OLMo 3",
        lambda c: hf.olmo3.Olmo3Config(**c, sliding_window=WINDOW, layer_types=HYBRID),
    ),
    "granite": ("Granite 3", lambda c: hf.granite.GraniteConfig(**c)),
    "smollm3": ("SmolLM3", lambda c: hf.smollm3.SmolLM3Config(**c)),
    "glm4": ("GLM-4", lambda c: hf.glm4.Glm4Config(**c, head_dim=16)),
    "starcoder2": (
        "StarCoder2 (windowed)",
        lambda c: hf.starcoder2.Starcoder2Config(**c, sliding_window=WINDOW),
    ),
    "stablelm": ("StableLM 2", lambda c: hf.stablelm.StableLmConfig(**c)),
    "phi": ("Phi-1.5, Phi-2", lambda c: hf.phi.PhiConfig(**c)),
    "falcon": (
        "Falcon (new decoder architecture)",
        lambda c: hf.falcon.FalconConfig(
            vocab_size=c["vocab_size"],
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bos_token_id=c["bos_token_id"],
            eos_token_id=c["eos_token_id"],
            pad_token_id=c["pad_token_id"],
        ),
    ),
    "deepseek-v3": (
        "DeepSeek-V3 / Kimi K2 style (multi-head latent attention, MoE)",
        lambda c: hf.deepseek_v3.DeepseekV3Config(
            **{**c, "num_key_value_heads": 4},
            moe_intermediate_size=32,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
        ),
    ),
    "gpt2": (
        "GPT-2",
        lambda c: hf.gpt2.GPT2Config(
            vocab_size=c["vocab_size"],
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=c["bos_token_id"],
            eos_token_id=c["eos_token_id"],
            pad_token_id=c["pad_token_id"],
        ),
    ),
}


def build_family_model(family: str, tokenizer_dir: Path, folder: Path, seed: int = 0) -> Path:
    """A tiny random ``family`` model with ``tokenizer_dir``'s tokenizer, saved to ``folder``."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = FAMILIES[family][1](_common(len(tokenizer), ids))
    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, _INIT_STD)
            elif "bias" in name:
                parameter.zero_()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
