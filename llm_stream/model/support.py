"""Whether a model can be served, decided from its config before any weight loads.

A model llm-stream cannot serve is refused at start with what it is and what to
do, never with a crash in its first request: encoder-decoder and other
non-causal models, models that need their own code, and layer kinds the slot
batch does not hold (:mod:`llm_stream.model.attention`).
"""

from __future__ import annotations

from typing import Any

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from llm_stream.errors import ModelLoadError
from llm_stream.model.attention import AttentionLayout, attention_layout


def causal_lm_class(config: Any) -> Any:
    """The transformers class that runs ``config`` as a causal LM, or a clear refusal."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"the model is an encoder-decoder ({model_type}); llm-stream serves decoder-only "
            "causal language models (Llama, Qwen, Mistral, Gemma...)"
        )
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"transformers has no causal language model for model type {model_type!r} (an "
            "encoder, vision or audio model?); llm-stream serves decoder-only causal language "
            "models"
        ) from None


def check_servable(config: Any) -> AttentionLayout:
    """Refuse what cannot be served; returns the model's attention layout."""
    causal_lm_class(config)
    return attention_layout(config)


def attention_implementation(config: Any) -> str:
    """``sdpa`` where the family supports it (its fused kernels, and the mask the slot
    batch builds), else ``eager`` (gpt-oss's attention sinks, say)."""
    model_class = causal_lm_class(config)
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def remote_code_refusal(location: str, exc: BaseException) -> ModelLoadError | None:
    """A clear refusal when loading failed because the model needs its own code."""
    text = str(exc)
    if "trust_remote_code" not in text and "custom code" not in text:
        return None
    return ModelLoadError(
        f"model {location} needs code from its repository (trust_remote_code), which "
        "llm-stream does not run; serve a model that transformers supports natively, or a "
        "conversion of this one to a native architecture"
    )
