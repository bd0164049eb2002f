"""The attention table: what each family's config asks of the slot batch, or why not."""

from __future__ import annotations

import pytest
from transformers import (
    AutoConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    T5Config,
)

from llm_stream.errors import ModelLoadError
from llm_stream.model.attention import attention_layout
from llm_stream.model.support import attention_implementation, check_servable

HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def test_full_attention_on_every_layer_needs_one_mask() -> None:
    layout = attention_layout(LlamaConfig(num_hidden_layers=3))
    assert layout.windows == {"full_attention": None}
    assert layout.distinct_windows == (None,)
    assert layout.describe() == "full"


def test_a_window_on_every_layer_comes_from_the_config() -> None:
    layout = attention_layout(MistralConfig(num_hidden_layers=2, sliding_window=4096))
    assert layout.windows == {"sliding_attention": 4096}
    assert layout.describe() == "window 4096"


def test_hybrid_layers_get_one_mask_per_kind() -> None:
    config = Gemma3TextConfig(num_hidden_layers=4, sliding_window=512, layer_types=HYBRID)
    layout = attention_layout(config)
    assert layout.windows == {"sliding_attention": 512, "full_attention": None}
    assert layout.distinct_windows == (None, 512)
    assert layout.describe() == "window 512 x 2 + full x 2"


def test_qwen2_windows_only_the_layers_past_max_window_layers() -> None:
    config = Qwen2Config(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=3
    )
    layout = attention_layout(config)
    assert layout.layer_types == ("full_attention",) * 3 + ("sliding_attention",)


@pytest.mark.parametrize(
    ("model_type", "fields", "feature"),
    [
        ("llama4_text", {"num_hidden_layers": 2, "attention_chunk_size": 64}, "chunked"),
        ("qwen3_next", {"num_hidden_layers": 4}, "linear attention"),
    ],
)
def test_layer_kinds_the_batch_cannot_hold_are_named(
    model_type: str, fields: dict[str, object], feature: str
) -> None:
    config = AutoConfig.for_model(model_type, **fields)
    with pytest.raises(ModelLoadError, match=feature):
        attention_layout(config)


def test_an_encoder_decoder_is_refused_as_such() -> None:
    with pytest.raises(ModelLoadError, match="encoder-decoder"):
        check_servable(T5Config())


def test_a_model_with_no_causal_lm_is_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"no causal language model.*'vit'"):
        check_servable(AutoConfig.for_model("vit"))


def test_families_without_sdpa_run_eager_attention() -> None:
    assert attention_implementation(LlamaConfig()) == "sdpa"
    assert attention_implementation(AutoConfig.for_model("gpt_oss")) == "eager"
