"""model_version identifies the weights actually loaded, and stays cheap to compute."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llm_stream.model.loader import cached_file_digest, file_digest, load_backend
from llm_stream.model.sources import parse_model_spec
from tests.conftest import prompt_request, running_server, tiny_settings


def test_digest_is_remembered_per_file_stat(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    cache = tmp_path / "cache"
    first = cached_file_digest([weights], cache)
    assert first == file_digest([weights])
    # Same size and mtime: the remembered digest is used, the bytes are not re-read.
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached_file_digest([weights], cache) == first
    # A real rewrite changes the mtime, and with it the digest.
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cached_file_digest([weights], cache) == file_digest([weights]) != first


def test_read_only_cache_still_gives_the_digest(tmp_path: Path) -> None:
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    assert cached_file_digest([weights], blocker) == file_digest([weights])


def test_folder_model_version_follows_its_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    spec = parse_model_spec(f"m={folder}")
    cache = tmp_path / "cache"
    version = load_backend(spec, "cpu", "auto", cache).version
    assert version.startswith("sha256-")
    assert load_backend(spec, "cpu", "auto", cache).version == version
    retrained = shutil.copytree(tiny_model_dir, tmp_path / "other")
    weights = next(retrained.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    other = load_backend(parse_model_spec(f"m={retrained}"), "cpu", "auto", cache).version
    assert other != version


async def test_random_weights_of_a_config_serve_the_same_model_twice(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """random:CONFIG@TOKENIZER: seeded, so a benchmark's baselines load the same model."""
    spec = parse_model_spec(f"rnd=random:{tiny_model_dir}@{tiny_model_dir}")
    first = load_backend(spec, "cpu", "auto", cache_dir)
    second = load_backend(spec, "cpu", "auto", cache_dir)
    assert first.version == second.version and first.version.startswith("random-seed0-")
    weights = [p.sum().item() for p in first._model.parameters()]
    assert weights == [p.sum().item() for p in second._model.parameters()]
    settings = tiny_settings(
        tiny_model_dir, cache_dir, models=(f"rnd=random:{tiny_model_dir}@{tiny_model_dir}",)
    )
    async with running_server(settings) as running:
        reply = await running.stub.Predict(prompt_request("Hello world", max_tokens=6))
        assert reply.usage.completion_tokens > 0 and reply.model_version == first.version
