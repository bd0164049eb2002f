"""Device and dtype choice: CUDA with bf16/fp16 where available, CPU fp32 otherwise."""

from __future__ import annotations

import torch

from llm_stream.errors import ModelLoadError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"--device {name!r} is not a device: use auto, cpu or cuda[:N]"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name} asked for, but this machine has no usable CUDA GPU")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"--dtype {name!r} unknown: use auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]
