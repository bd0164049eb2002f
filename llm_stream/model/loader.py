"""Load a registry entry into an :class:`HFBackend`.

GGUF files (the embedded default among them) are dequantised once, which takes
about 18 s on a 2-core machine, and cached as a safetensors folder that later
starts load in about 2 s. ``model_version`` is a digest of the weights actually
loaded (or the hub commit), never a constant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llm_stream.errors import ModelLoadError
from llm_stream.model.backend import HFBackend, eos_token_ids, pad_token_id
from llm_stream.model.device import resolve_device, resolve_dtype
from llm_stream.model.execution import ExecutionOptions, build_runner
from llm_stream.model.random_weights import random_model
from llm_stream.model.sources import ModelSpec, embedded_gguf_path
from llm_stream.model.support import (
    attention_implementation,
    check_servable,
    remote_code_refusal,
)

log = logging.getLogger(__name__)

_MARKER = "llm-stream-conversion.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def file_digest(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, shortened for display."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256-" + digest.hexdigest()[:16]


def cached_file_digest(paths: list[Path], cache_dir: Path) -> str:
    """:func:`file_digest`, remembered per (path, size, mtime) of every file.

    Hashing a 7B model's 15 GB on every start would add tens of seconds to each
    rollout; the files' stat changes whenever their bytes do.
    """
    key = json.dumps(
        sorted((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    )
    store = cache_dir / "digests"
    entry = store / (hashlib.sha256(key.encode()).hexdigest() + ".json")
    try:
        saved = json.loads(entry.read_text(encoding="utf-8"))
        if saved.get("key") == key and isinstance(saved.get("digest"), str):
            return str(saved["digest"])
    except (OSError, ValueError):
        pass
    digest = file_digest(paths)
    try:
        store.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps({"key": key, "digest": digest}), encoding="utf-8")
    except OSError as exc:  # a read-only cache only costs the hashing next time
        log.warning("cannot remember the weights digest in %s: %s", store, exc)
    return digest


def load_backend(
    spec: ModelSpec,
    device_name: str,
    dtype_name: str,
    cache_dir: Path,
    options: ExecutionOptions | None = None,
) -> HFBackend:
    """Load ``spec`` onto its device and build its runner (KV cache, CUDA graphs)."""
    model, tokenizer, version, device = load_weights(spec, device_name, dtype_name, cache_dir)
    pad_id = pad_token_id(tokenizer, eos_token_ids(model, tokenizer))
    runner, execution = build_runner(model, device, pad_id, options or ExecutionOptions())
    return HFBackend(
        spec.model_id, model, tokenizer, version, device, runner=runner, execution=execution
    )


def load_weights(
    spec: ModelSpec, device_name: str, dtype_name: str, cache_dir: Path
) -> tuple[Any, Any, str, torch.device]:
    """(model on its device in eval mode, tokenizer, version, device) of ``spec``."""
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    started = time.monotonic()
    log.info(
        "loading model %s (%s %s) on %s as %s",
        spec.model_id,
        spec.kind,
        spec.location,
        device,
        str(dtype).removeprefix("torch."),
    )
    try:
        if spec.kind == "gguf":
            folder, version = _converted_gguf(Path(spec.location), cache_dir)
            model, tokenizer = _from_folder(str(folder), dtype)
        elif spec.kind == "random":
            tokenizer_dir = Path(spec.tokenizer) if spec.tokenizer else None
            if tokenizer_dir is None:
                tokenizer_dir, _ = _converted_gguf(embedded_gguf_path(), cache_dir)
            model, tokenizer, version = random_model(spec.location, tokenizer_dir, dtype, device)
        elif spec.kind == "directory":
            folder = Path(spec.location)
            weights = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
            version = cached_file_digest(weights, cache_dir)
            model, tokenizer = _from_folder(spec.location, dtype)
        else:
            model, tokenizer, version = _from_hub(spec, dtype, cache_dir)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"cannot load model {spec.model_id!r} from {spec.location}: {exc}"
        ) from exc
    try:
        check_servable(model.config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot serve model {spec.model_id!r}: {exc}") from None
    model.to(device)
    model.eval()
    log.info(
        "loaded model %s version %s in %.1f s", spec.model_id, version, time.monotonic() - started
    )
    return model, tokenizer, version, device


def _servable_config(location: str, **kwargs: Any) -> Any:
    """The model's config, refused before its weights load if it cannot be served."""
    try:
        # Never code from the model's repository, and never a prompt asking about it.
        config = AutoConfig.from_pretrained(location, trust_remote_code=False, **kwargs)
    except ValueError as exc:
        refusal = remote_code_refusal(location, exc)
        if refusal is not None:
            raise refusal from None
        raise
    try:
        check_servable(config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"cannot serve model {location}: {exc}") from None
    return config


def _from_folder(folder: str, dtype: torch.dtype) -> tuple[Any, Any]:
    config = _servable_config(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, attn_implementation=attention_implementation(config)
    )
    return model, tokenizer


def _from_hub(spec: ModelSpec, dtype: torch.dtype, cache_dir: Path) -> tuple[Any, Any, str]:
    hub_cache = str(cache_dir / "hub")
    kwargs: dict[str, Any] = {"revision": spec.revision, "cache_dir": hub_cache}
    config = _servable_config(spec.location, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(spec.location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        spec.location,
        config=config,
        dtype=dtype,
        attn_implementation=attention_implementation(config),
        **kwargs,
    )
    commit = getattr(model.config, "_commit_hash", None) or spec.revision or "unknown-revision"
    return model, tokenizer, f"{spec.location}@{commit}"


def _converted_gguf(gguf: Path, cache_dir: Path) -> tuple[Path, str]:
    """Return a safetensors folder for ``gguf``, converting it on first use."""
    version = cached_file_digest([gguf], cache_dir)
    target = cache_dir / "converted" / f"{gguf.stem}-{version}"
    marker = target / _MARKER
    if marker.is_file():
        log.info("using cached conversion %s", target)
        return target, version
    log.info("converting %s to safetensors in %s (once; about 20 s on 2 CPU cores)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained; rebuild it from a clean config.
        config_dict = quantised.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps({"source": str(gguf), "version": version}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target, version
