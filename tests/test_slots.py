"""The slot batch through the runner's seam: a row computes what it computes alone.

Rows join (whole or chunked prompts, several at once with different lengths),
decode side by side and leave in any order; each row's greedy tokens must equal
the same prompt decoded alone with transformers' own cache. The runner here is
the one the server builds for the CPU (growable slots, eager decode); on a GPU
the same buffers are static and the decode forward is a replayed CUDA graph
(tests/test_gpu.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
)

from llm_stream.engine.types import (
    GenerationRequest,
    PrefillChunk,
    PreparedRequest,
    SamplingParams,
    StepPlan,
)
from llm_stream.model.execution import ExecutionOptions, SlotBudget, build_runner, static_runner
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.slots import probe_layers
from tests.model_families import build_family_model

CPU = torch.device("cpu")
SHORT = [5, 9, 14]
LONG = [7, 3, 22, 41, 8, 19, 30, 11, 42, 17, 6]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return loaded.eval()


def new_runner(model: Any, **options: Any) -> HFStepRunner:
    runner, _ = build_runner(model, CPU, 0, ExecutionOptions(**options))
    return runner


@torch.inference_mode()
def alone(model: Any, prompt: list[int], steps: int) -> list[int]:
    """The greedy tokens of a prompt decoded by itself with transformers' own cache."""
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([prompt]), cache=cache).logits[0, -1]
    tokens = [int(logits.argmax())]
    for _ in range(steps - 1):
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens


def chunk(
    key: int, prompt: list[int], start: int = 0, end: int | None = None, **sampling: Any
) -> PrefillChunk:
    request = GenerationRequest(f"r{key}", "tiny", "p", SamplingParams(max_tokens=64, **sampling))
    prepared = PreparedRequest(request, tuple(prompt), 64)
    return PrefillChunk(key, prepared, start, len(prompt) if end is None else end)


class Driver:
    """Runs plans through a runner and keeps each key's tokens."""

    def __init__(self, runner: HFStepRunner) -> None:
        self.runner = runner
        self.tokens: dict[int, list[int]] = {}
        self.step = 0

    def run(
        self, *prefill: PrefillChunk, decode: bool = True, remove: tuple[int, ...] = ()
    ) -> None:
        self.step += 1
        self.runner.launch(StepPlan(self.step, remove, decode, tuple(prefill)))
        result = self.runner.collect()
        assert not result.failed, result.failed
        for key, token in result.tokens:
            self.tokens.setdefault(key, []).append(token)


def test_rows_that_join_and_leave_compute_what_they_compute_alone(model: Any) -> None:
    prompts = {1: SHORT, 2: LONG, 3: [4, 4, 4, 4], 4: [9, 8], 5: [30, 31, 32, 33, 34, 35, 36]}
    drive = Driver(new_runner(model))
    drive.run(chunk(1, SHORT), decode=False)
    drive.run()
    drive.run(chunk(2, LONG), chunk(3, [4, 4, 4, 4]))  # two lengths in one padded prefill
    drive.run()
    drive.run(remove=(1,))  # the first row leaves; the last moves into its slot
    drive.run(chunk(4, [9, 8]))
    drive.run(chunk(5, prompts[5], 0, 3))  # a prompt fed in chunks while others decode
    drive.run(chunk(5, prompts[5], 3, 7))
    for _ in range(3):
        drive.run()
    drive.run(remove=(3, 2))
    drive.run()
    for key, tokens in drive.tokens.items():
        assert tokens == alone(model, prompts[key], len(tokens)), key


def test_a_chunked_prompt_equals_the_whole_prompt(model: Any) -> None:
    drive = Driver(new_runner(model))
    drive.run(chunk(1, LONG, 0, 4), decode=False)
    drive.run(chunk(1, LONG, 4, 8))
    drive.run(chunk(1, LONG, 8))
    for _ in range(4):
        drive.run()
    assert drive.tokens[1] == alone(model, LONG, 5)


def test_a_prompt_fed_in_chunks_survives_the_last_decoding_row_leaving(model: Any) -> None:
    drive = Driver(new_runner(model))
    drive.run(chunk(1, SHORT), decode=False)
    drive.run(chunk(2, LONG, 0, 5))
    drive.run(chunk(2, LONG, 5), remove=(1,))  # the only decoding row leaves while LONG is half fed
    assert drive.tokens[2] == alone(model, LONG, 1)
    assert drive.runner.rows == 1


def test_the_cpu_batch_grows_rows_and_positions(model: Any) -> None:
    """The CPU slots start small (8 rows of 255 tokens) and grow as rows join and lengthen."""
    prompts = {key: [(key * 7 + i) % 300 + 3 for i in range(40 + key * 25)] for key in range(1, 13)}
    drive = Driver(new_runner(model))
    drive.run(*(chunk(key, prompt) for key, prompt in prompts.items()), decode=False)
    for _ in range(5):
        drive.run()
    for key, prompt in prompts.items():
        assert drive.tokens[key] == alone(model, prompt, 6), key


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_a_batch(model: Any) -> None:
    seeded = {"temperature": 1.0, "top_p": 0.9, "seed": 11}
    single = Driver(new_runner(model))
    single.run(chunk(1, LONG, **seeded), decode=False)
    for _ in range(7):
        single.run()
    busy = Driver(new_runner(model))
    busy.run(chunk(2, SHORT, temperature=0.7, seed=3), decode=False)
    busy.run(chunk(1, LONG, **seeded), chunk(3, [4, 4, 4]))
    for _ in range(7):
        busy.run()
    assert busy.tokens[1] == single.tokens[1]


def test_a_failed_prefill_leaves_the_batch_intact(model: Any) -> None:
    runner = new_runner(model)
    drive = Driver(runner)
    drive.run(chunk(1, SHORT), decode=False)
    runner.launch(StepPlan(9, (), True, (chunk(2, LONG, 5),)))  # a later chunk, never started
    result = runner.collect()
    assert [key for key, _ in result.failed] == [2]
    assert [key for key, _ in result.tokens] == [1]
    drive.tokens[1].append(result.tokens[0][1])
    drive.run()
    assert drive.tokens[1] == alone(model, SHORT, 3)


WINDOWED = {1: [(i * 7) % 300 + 3 for i in range(60)], 2: [(i * 5) % 290 + 4 for i in range(23)]}
WINDOWED[3] = [(i * 11) % 280 + 5 for i in range(41)]


@pytest.mark.parametrize("family", ["mistral-window", "gemma3"])
@pytest.mark.parametrize("fixed", [False, True], ids=["growable", "fixed"])
def test_sliding_window_rows_compute_what_they_compute_alone(
    family: str, fixed: bool, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Windowed layers see only their window (16 here), full layers everything: prompts
    longer than the window, joining, chunked, leaving, decoding well past it."""
    folder = build_family_model(family, tiny_model_dir, tmp_path / family)
    windowed: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    windowed.eval()
    if fixed:
        layers = probe_layers(windowed, CPU)
        runner = static_runner(windowed, CPU, 0, layers, rows=4, budget=SlotBudget(255, "test"))
    else:
        runner = new_runner(windowed)
    drive = Driver(runner)
    drive.run(chunk(1, WINDOWED[1]), decode=False)
    for _ in range(3):
        drive.run()
    drive.run(chunk(2, WINDOWED[2]), chunk(3, WINDOWED[3], 0, 20))
    drive.run(chunk(3, WINDOWED[3], 20))
    for _ in range(5):
        drive.run()
    drive.run(remove=(1,))
    for _ in range(20):
        drive.run()
    for key, tokens in drive.tokens.items():
        assert tokens == alone(windowed, WINDOWED[key], len(tokens)), key


def test_decoding_past_the_cpu_slots_length_grows_them(model: Any) -> None:
    prompt = [(i * 13) % 300 + 3 for i in range(250)]
    drive = Driver(new_runner(model))
    drive.run(chunk(1, prompt), decode=False)
    for _ in range(20):  # 250 + 20 tokens: past the first 255 positions
        drive.run()
    assert drive.tokens[1] == alone(model, prompt, 21)


def test_fixed_buffers_padded_to_buckets_compute_what_rows_compute_alone(model: Any) -> None:
    """The GPU layout, uncaptured: rows padded up to a rows bucket, attention over a
    width bucket, slots that never move; rows cross the 8-row and 256-position buckets."""
    runner = static_runner(
        model, CPU, 0, probe_layers(model, CPU), rows=16, budget=SlotBudget(511, "test")
    )
    assert runner.graphs is not None and runner.graphs.sizes == [1, 2, 4, 8, 16]
    prompts = {key: [(key * 11 + i) % 300 + 3 for i in range(5 + key * 3)] for key in range(1, 11)}
    prompts[11] = [(i * 7) % 300 + 3 for i in range(240)]
    drive = Driver(runner)
    drive.run(chunk(1, prompts[1]), decode=False)
    drive.run(chunk(2, prompts[2]), chunk(3, prompts[3]))
    drive.run(*(chunk(key, prompts[key]) for key in range(4, 10)))  # 9 rows: bucket 16
    drive.run(chunk(11, prompts[11], 0, 100), remove=(2,))
    drive.run(chunk(11, prompts[11], 100))
    drive.run(chunk(10, prompts[10]), remove=(5, 1))
    for _ in range(20):  # the long row passes 256 positions: the next width bucket
        drive.run()
    for key, tokens in drive.tokens.items():
        assert tokens == alone(model, prompts[key], len(tokens)), key


def test_a_prompt_finding_the_staging_slot_busy_takes_the_eager_path(model: Any) -> None:
    """One prompt is fed in the staging slot over several steps; another prompt in the
    meantime is prefilled with its own cache; one leaving mid-way frees the slot."""
    runner = static_runner(
        model, CPU, 0, probe_layers(model, CPU), rows=8, budget=SlotBudget(511, "test")
    )
    long_prompt = [(i * 5) % 300 + 3 for i in range(150)]
    dropped = [(i * 3) % 300 + 3 for i in range(90)]
    drive = Driver(runner)
    drive.run(chunk(1, long_prompt, 0, 50), chunk(2, SHORT), decode=False)  # 2 goes eager
    drive.run(chunk(1, long_prompt, 50, 100), chunk(3, LONG))
    drive.run(chunk(1, long_prompt, 100))
    drive.run(chunk(4, dropped, 0, 40))  # takes the free slot, then leaves half fed
    drive.run(remove=(4,))
    drive.run(chunk(5, SHORT))  # the slot is free again
    for _ in range(4):
        drive.run()
    prompts = {1: long_prompt, 2: SHORT, 3: LONG, 5: SHORT}
    assert set(drive.tokens) == set(prompts)
    for key, tokens in drive.tokens.items():
        assert tokens == alone(model, prompts[key], len(tokens)), key


def test_a_cold_start_of_many_prompts_is_fed_in_padded_batches(model: Any) -> None:
    """With nobody decoding, sixteen prompts of two lengths are two padded eager
    batches, not sixteen staged forwards; a prompt joining a decoding batch is staged."""
    runner = static_runner(
        model, CPU, 0, probe_layers(model, CPU), rows=24, budget=SlotBudget(511, "test")
    )
    prompts = {
        key: [(key * 7 + i) % 300 + 3 for i in range(20 if key % 2 else 40)] for key in range(1, 17)
    }
    prompts[17] = SHORT
    staged: list[int] = []
    feed = runner._feed_staged

    def counted(piece: PrefillChunk) -> Any:
        staged.append(piece.key)
        return feed(piece)

    runner._feed_staged = counted  # type: ignore[method-assign]
    drive = Driver(runner)
    drive.run(*(chunk(key, prompts[key]) for key in range(1, 17)), decode=False)
    assert staged == []
    drive.run(chunk(17, prompts[17]))
    assert staged == [17]
    for _ in range(3):
        drive.run()
    for key, tokens in drive.tokens.items():
        assert tokens == alone(model, prompts[key], len(tokens)), key
