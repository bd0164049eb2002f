"""The shared left-padded cache: rows joining, leaving and chunked never change a row's logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from llm_stream.engine.types import GenerationRequest, PrefillChunk, PreparedRequest, SamplingParams
from llm_stream.errors import ModelLoadError
from llm_stream.model.kv_batch import (
    KVBatch,
    append,
    decode_step,
    extend_row,
    forward_prompts,
    remove_rows,
)
from llm_stream.model.loader import load_backend
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.sources import parse_model_spec

CPU = torch.device("cpu")
SHORT = [5, 9, 14]
LONG = [7, 3, 22, 41, 8, 19, 30, 11, 42, 17, 6]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return loaded.eval()


@torch.inference_mode()
def alone(model: Any, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """The logits of a row run by itself, greedy, for ``steps`` decode steps after prefill."""
    batch, logits = forward_prompts(model, [prompt], 0, CPU)
    out = [logits[0]]
    for _ in range(steps):
        logits = decode_step(model, batch, logits.argmax(-1))
        out.append(logits[0])
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_rows_that_join_and_leave_compute_what_they_compute_alone(model: Any) -> None:
    short_alone, long_alone = alone(model, SHORT, 7), alone(model, LONG, 4)

    batch, logits = forward_prompts(model, [SHORT], 0, CPU)
    short = [logits[0]]
    for _ in range(2):
        logits = decode_step(model, batch, logits.argmax(-1))
        short.append(logits[0])
    # The long prompt joins mid-way: its cache is wider, so the short row gets padded.
    joined, long_logits = forward_prompts(model, [LONG], 0, CPU)
    append(batch, joined)
    assert batch.rows == 2 and batch.width == max(len(SHORT) + 2, len(LONG))
    long = [long_logits[0]]
    tokens = torch.stack([short[-1].argmax(), long_logits[0].argmax()])
    for _ in range(4):
        logits = decode_step(model, batch, tokens)
        short.append(logits[0])
        long.append(logits[1])
        tokens = logits.argmax(-1)
    # The long row leaves; the short one goes on alone, its padding trimmed.
    assert remove_rows(batch, [1]) == [0]
    assert batch.width == len(SHORT) + 6
    short.append(decode_step(model, batch, tokens[:1])[0])

    assert all(close(a, b) for a, b in zip(short, short_alone, strict=True))
    assert all(close(a, b) for a, b in zip(long, long_alone, strict=True))


@torch.inference_mode()
def test_padded_batch_prefill_equals_single_rows(model: Any) -> None:
    batch, logits = forward_prompts(model, [SHORT, LONG], 0, CPU)
    assert batch.positions.tolist() == [len(SHORT), len(LONG)]
    assert close(logits[0], alone(model, SHORT, 0)[0])
    assert close(logits[1], alone(model, LONG, 0)[0])


@torch.inference_mode()
def test_chunked_prefill_equals_whole_prefill(model: Any) -> None:
    chunked: KVBatch
    chunked, _ = forward_prompts(model, [LONG[:4]], 0, CPU)
    extend_row(model, chunked, LONG[4:8])
    last = extend_row(model, chunked, LONG[8:])
    assert close(last[0], alone(model, LONG, 0)[0])
    assert int(chunked.positions[0]) == len(LONG)


@torch.inference_mode()
def test_leaving_rows_are_replaced_by_the_last_ones(model: Any) -> None:
    prompts = [SHORT, LONG, [4, 4, 4, 4], [9, 8], [30, 31, 32, 33, 34]]
    expected = [alone(model, p, 3) for p in prompts]
    batch, logits = forward_prompts(model, prompts[:2], 0, CPU)
    for prompt in prompts[2:]:  # joining one by one: the batch grows past its first rows
        joined, more = forward_prompts(model, [prompt], 0, CPU)
        append(batch, joined)
        logits = torch.cat([logits, more])
    rows = list(range(len(prompts)))
    got: dict[int, list[torch.Tensor]] = {r: [logits[i]] for i, r in enumerate(rows)}
    tokens = logits.argmax(-1)
    for step in range(3):
        logits = decode_step(model, batch, tokens)
        for i, r in enumerate(rows):
            got[r].append(logits[i])
        tokens = logits.argmax(-1)
        if step == 0:  # rows 0 and 2 leave: the last rows move into their slots
            order = remove_rows(batch, [0, 2])
            assert order == [3, 1, 4]
            rows = [rows[i] for i in order]
            tokens = tokens[order]
    for r in rows:
        assert all(close(a, b) for a, b in zip(got[r], expected[r], strict=True)), r


def prefill_chunk(key: int, prompt: list[int], start: int, end: int) -> PrefillChunk:
    request = GenerationRequest(f"r{key}", "tiny", "p", SamplingParams(max_tokens=8))
    return PrefillChunk(key, PreparedRequest(request, tuple(prompt), 8), start, end)


def test_a_prompt_fed_in_chunks_survives_the_last_decoding_row_leaving(model: Any) -> None:
    runner = HFStepRunner(model, CPU, pad_id=0)
    assert runner.prefill([prefill_chunk(1, SHORT, 0, len(SHORT))])[0] is not None
    assert runner.prefill([prefill_chunk(2, LONG, 0, 5)]) == [None]
    runner.remove({1})  # the only decoding row leaves while LONG is half fed
    (first,) = runner.prefill([prefill_chunk(2, LONG, 5, len(LONG))])
    assert first == int(alone(model, LONG, 0)[0].argmax())
    assert runner.rows == 1


def test_models_with_sliding_window_layers_are_refused(
    tmp_path: Path, tiny_model_dir: Path, cache_dir: Path
) -> None:
    """Their layers keep only a window: the shared batch cannot pad or trim them."""
    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=8,
    )
    folder = tmp_path / "mistral"
    MistralForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="sliding-window"):
        load_backend(parse_model_spec(f"mistral={folder}"), "cpu", "float32", cache_dir)
