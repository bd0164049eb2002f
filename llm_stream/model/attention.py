"""What each kind of attention layer needs from the slot batch: one table.

A model's config says, layer by layer, which kind of attention it runs
(``layer_types``, or a ``sliding_window`` on every layer); transformers' own
:func:`get_layer_types_and_kwargs` reads it the same way for every family. The
slot batch keeps every layer's whole history and gives each kind its own mask:
full layers see every earlier position, sliding-window layers the last
``window`` positions (the query's own included), as transformers'
``sliding_window_overlay`` does. Kinds the batch cannot hold are refused at
load, naming the feature, before any request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers.cache_utils import get_layer_types_and_kwargs

from llm_stream.errors import ModelLoadError

FULL = "full_attention"
SLIDING = "sliding_attention"

# Layer kinds the slot batch serves, and how to read each one's window from the
# kwargs transformers gives its cache layer (None: no window, every position).
_SERVED: Mapping[str, str | None] = {FULL: None, SLIDING: "sliding_window"}

# Layer kinds it refuses, and what they are in a user's words.
_REFUSED: Mapping[str, str] = {
    "chunked_attention": "chunked local attention (Llama 4)",
    "linear_attention": "linear attention layers with a recurrent state (Qwen3-Next, MiniMax)",
    "mamba": "Mamba state-space layers",
    "conv": "short convolution layers with a state (LFM2)",
    "hybrid": "hybrid state-space layers",
    "hybrid_sliding": "hybrid state-space layers",
    "dummy": "layers that share another layer's KV cache or hold none",
    "heavily_compressed_attention": "compressed sparse attention (DeepSeek-V4)",
    "compressed_sparse_attention": "compressed sparse attention (DeepSeek-V4)",
}


@dataclass(frozen=True)
class AttentionLayout:
    """Each layer's kind, and the window of every kind the model uses (None: full)."""

    layer_types: tuple[str, ...]
    windows: Mapping[str, int | None]

    @property
    def distinct_windows(self) -> tuple[int | None, ...]:
        """The masks a step needs: one per distinct window, full first."""
        found = set(self.windows.values())
        return tuple(sorted(found, key=lambda w: -1 if w is None else w))

    def describe(self) -> str:
        """For the ready line: ``full`` or e.g. ``sliding 4096 x 20 + full x 6``."""
        parts = []
        for kind, window in self.windows.items():
            count = self.layer_types.count(kind)
            parts.append(f"full x {count}" if window is None else f"window {window} x {count}")
        return " + ".join(parts) if len(parts) > 1 else parts[0].split(" x ")[0]


def attention_layout(config: Any) -> AttentionLayout:
    """The layout of ``config``'s decoder, or :class:`ModelLoadError` naming what is not served."""
    text_config = config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    windows: dict[str, int | None] = {}
    refused: set[str] = set()
    for kind, kwargs in zip(layer_types, layer_kwargs, strict=True):
        if kind not in _SERVED:
            refused.add(kind)
            continue
        field = _SERVED[kind]
        window = None if field is None else kwargs.get(field)
        if field is not None and (not isinstance(window, int) or window < 1):
            raise ModelLoadError(
                f"the model's {kind} layers have no usable window ({window!r}); "
                "set sliding_window in its config.json"
            )
        if windows.setdefault(kind, window) != window:
            raise ModelLoadError(
                f"the model's {kind} layers use different windows; llm-stream serves one "
                "window per layer kind"
            )
    if refused:
        features = sorted(
            {_REFUSED.get(kind, f"attention layers of kind {kind!r}") for kind in refused}
        )
        raise ModelLoadError(
            f"the model uses {'; '.join(features)}, which llm-stream's continuous batch does "
            "not serve; serve a model whose layers are full or sliding-window attention "
            "(see the README's supported model families)"
        )
    if not windows:
        raise ModelLoadError("the model's config names no attention layers")
    return AttentionLayout(tuple(layer_types), windows)
