"""The prefix cache in the runner: reused KV gives exactly the tokens of a full prefill,
and the cache stays within what running sequences leave it.

Driven through the runner's seam as the scheduler drives it: ``reuse_prefix`` at
admission, then the prompt's chunks from where the cache left off. Both layouts
run here: the CPU's growable slots (prefills in their own caches) and the GPU's
fixed buffers, uncaptured (prompts fed in the staging slot, or eagerly when it
is busy); full attention, every layer windowed, and hybrid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_stream.engine.types import (
    GenerationRequest,
    PrefillChunk,
    PreparedRequest,
    SamplingParams,
    StepPlan,
)
from llm_stream.model.execution import (
    ExecutionOptions,
    SlotBudget,
    build_runner,
    cpu_prefix_room,
    static_runner,
)
from llm_stream.model.prefix_cache import PrefixCache
from llm_stream.model.prefix_index import BLOCK_TOKENS
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.slots import probe_layers
from tests.model_families import build_family_model
from tests.test_slots import Driver, alone, chunk

CPU = torch.device("cpu")
B = BLOCK_TOKENS


def prompt_of(seed: int, length: int) -> list[int]:
    return [(seed * 31 + i * 7) % 290 + 5 for i in range(length)]


def load(folder: Path) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load(tiny_model_dir)


def runner_for(model: Any, layout: str, capacity: int = 4096) -> HFStepRunner:
    if layout == "fixed":
        runner = static_runner(
            model, CPU, 0, probe_layers(model, CPU), rows=4, budget=SlotBudget(511, "test")
        )
        runner.prefix = PrefixCache(capacity, lambda costs: None)
        return runner
    options = ExecutionOptions(prefix_cache_tokens=capacity)
    runner, _ = build_runner(model, CPU, 0, options)
    assert runner.prefix is not None
    return runner


class Conversation:
    """Admits prompts as the scheduler does: asks the runner what it holds, feeds the rest."""

    def __init__(self, runner: HFStepRunner) -> None:
        self.drive = Driver(runner)
        self.runner = runner
        self.reused: dict[int, int] = {}

    def admit(self, key: int, prompt: list[int], *, chunk_size: int = 0, **sampling: Any) -> None:
        """Prefill ``prompt`` from what the cache holds, in chunks of ``chunk_size`` (0: whole)."""
        first = chunk(key, prompt, **sampling)
        reused = min(self.runner.reuse_prefix(key, first.prepared), len(prompt) - 1)
        self.reused[key] = reused
        start = reused
        while start < len(prompt):
            end = len(prompt) if not chunk_size else min(len(prompt), start + chunk_size)
            self.drive.run(chunk(key, prompt, start, end, **sampling), decode=False)
            start = end

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.drive.run()

    def leave(self, *keys: int) -> None:
        self.drive.run(decode=False, remove=keys)


def answer_then_next_turn(
    model: Any, layout: str, *, keep: int, new_tokens: int = 30, chunk_size: int = 0
) -> tuple[Conversation, list[int]]:
    """Turn 1 answers 12 tokens and leaves; turn 2 repeats turn 1 with ``keep`` tokens of
    the answer (fewer than it generated: a prefix ending mid-answer) and new tokens."""
    chat = Conversation(runner_for(model, layout))
    turn1 = prompt_of(1, 45)
    chat.admit(1, turn1)
    chat.decode(11)
    chat.leave(1)
    answer = chat.drive.tokens[1]
    turn2 = turn1 + answer[:keep] + prompt_of(2, new_tokens)
    chat.admit(2, turn2, chunk_size=chunk_size)
    chat.decode(9)
    return chat, turn2


@pytest.mark.parametrize("layout", ["growable", "fixed"])
def test_the_next_turn_reuses_the_last_and_computes_the_same_tokens(
    model: Any, layout: str
) -> None:
    chat, turn2 = answer_then_next_turn(model, layout, keep=7)
    # Turn 1's prompt and the 7 answer tokens kept, 52 tokens, in whole blocks: 48.
    assert chat.reused[2] == 48
    assert chat.drive.tokens[2] == alone(model, turn2, 10)


@pytest.mark.parametrize("layout", ["growable", "fixed"])
def test_what_follows_a_cached_prefix_may_be_fed_in_chunks(model: Any, layout: str) -> None:
    chat, turn2 = answer_then_next_turn(model, layout, keep=12, new_tokens=70, chunk_size=20)
    # 45 + 11 tokens held (the last answer token was never fed back): 3 blocks.
    assert chat.reused[2] == 48
    assert chat.drive.tokens[2] == alone(model, turn2, 10)


@pytest.mark.parametrize("layout", ["growable", "fixed"])
def test_the_same_prompt_again_computes_only_its_last_token(model: Any, layout: str) -> None:
    chat = Conversation(runner_for(model, layout))
    prompt = prompt_of(3, 40)
    for key in range(1, 6):
        chat.admit(key, prompt)
        chat.decode(5)
        chat.leave(key)
        assert chat.drive.tokens[key] == alone(model, prompt, 6), key
    # All but the last token, in whole blocks.
    assert chat.reused == {1: 0, 2: 32, 3: 32, 4: 32, 5: 32}


def test_an_edited_earlier_turn_reuses_only_what_precedes_the_edit(model: Any) -> None:
    chat = Conversation(runner_for(model, "growable"))
    conversation = prompt_of(4, 80)
    chat.admit(1, conversation)
    chat.decode(3)
    chat.leave(1)
    edited = [*conversation[:37], 299, *conversation[38:], *prompt_of(5, 10)]
    chat.admit(2, edited)
    chat.decode(7)
    assert chat.reused[2] == 32  # the whole blocks before the edit at 37
    assert chat.drive.tokens[2] == alone(model, edited, 8)


def test_a_prompt_finding_the_staging_slot_busy_reuses_its_prefix_eagerly(model: Any) -> None:
    chat = Conversation(runner_for(model, "fixed"))
    shared = prompt_of(6, 48)
    chat.admit(1, shared)
    chat.decode(2)
    chat.leave(1)
    long_prompt = prompt_of(7, 150)
    chat.drive.run(chunk(2, long_prompt, 0, 50), decode=False)  # holds the staging slot
    follow_up = shared + prompt_of(8, 20)
    first = chunk(3, follow_up)
    reused = chat.runner.reuse_prefix(3, first.prepared)
    assert reused == 48
    chat.drive.run(chunk(2, long_prompt, 50, 100), chunk(3, follow_up, reused))
    chat.drive.run(chunk(2, long_prompt, 100))
    for _ in range(5):
        chat.drive.run()
    for key, prompt in ((3, follow_up), (2, long_prompt)):
        tokens = chat.drive.tokens[key]
        assert tokens == alone(model, prompt, len(tokens)), key


@pytest.mark.parametrize("family", ["mistral-window", "gemma3"])
@pytest.mark.parametrize("layout", ["growable", "fixed"])
def test_windowed_layers_see_only_their_window_after_a_reused_prefix(
    family: str, layout: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The window is 16 tokens: the reused prefix (52 tokens) is far longer, and the next
    turn's windowed layers must see just the last 16, as a full prefill's do."""
    windowed = load(build_family_model(family, tiny_model_dir, tmp_path / family))
    for keep in (0, 5):
        chat, turn2 = answer_then_next_turn(windowed, layout, keep=keep, chunk_size=8)
        assert chat.reused[2] >= 32
        assert chat.drive.tokens[2] == alone(windowed, turn2, 10), keep


def test_a_seeded_row_draws_the_same_tokens_from_a_reused_prefix(model: Any) -> None:
    seeded: dict[str, Any] = {"temperature": 1.0, "top_p": 0.9, "seed": 5}
    prompt = prompt_of(9, 60)
    fresh = Conversation(runner_for(model, "growable"))
    fresh.admit(1, prompt, **seeded)
    fresh.decode(9)
    cached = Conversation(runner_for(model, "growable"))
    cached.admit(1, prompt[:40])
    cached.decode(1)
    cached.leave(1)
    cached.admit(2, prompt, **seeded)
    cached.decode(9)
    assert cached.reused[2] == 32
    assert cached.drive.tokens[2] == fresh.drive.tokens[1]


def test_a_reused_prefix_leaves_the_cached_entry_intact(model: Any) -> None:
    """Two prompts reuse one entry at once; each writes its own slot, never the entry."""
    chat = Conversation(runner_for(model, "growable"))
    shared = prompt_of(10, 40)
    chat.admit(1, shared)
    chat.decode(1)
    chat.leave(1)
    a, b = shared + prompt_of(11, 9), shared + prompt_of(12, 17)
    chat.admit(2, a)
    chat.admit(3, b)
    chat.decode(6)
    assert chat.reused[2] == chat.reused[3] == 32
    assert chat.drive.tokens[2] == alone(model, a, 7)
    assert chat.drive.tokens[3] == alone(model, b, 7)


@pytest.mark.parametrize("layout", ["growable", "fixed"])
def test_a_prompt_reuses_a_running_rows_prefix_from_its_slot(model: Any, layout: str) -> None:
    """Nothing has left yet: the newcomer's shared system prompt (and more) is copied
    from the slot of the row still decoding, which goes on unharmed."""
    chat = Conversation(runner_for(model, layout))
    system = prompt_of(13, 40)
    first = system + prompt_of(14, 12)
    chat.admit(1, first)
    chat.decode(4)
    assert chat.runner.prefix is not None and chat.runner.prefix.index.used == 0
    follow_up = system + prompt_of(15, 9)
    chat.admit(2, follow_up)
    assert chat.reused[2] == 32  # the 40 shared tokens, in whole blocks
    # The first row's own tokens so far (prompt and answer) for a third, more of them.
    held = first + chat.drive.tokens[1][:3]
    chat.admit(3, held + prompt_of(16, 5))
    assert chat.reused[3] == 48  # 55 held in its slot: 3 blocks
    chat.decode(6)
    assert chat.drive.tokens[1] == alone(model, first, len(chat.drive.tokens[1]))
    for key, prompt in ((2, follow_up), (3, held + prompt_of(16, 5))):
        assert chat.drive.tokens[key] == alone(model, prompt, len(chat.drive.tokens[key])), key


@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma3"])
def test_rests_of_prompts_behind_one_cached_prefix_are_fed_together(
    family: str, tmp_path: Path, tiny_model_dir: Path, model: Any
) -> None:
    """A burst of chats behind one cached system prompt: their rests, of different
    lengths, go through one right-padded forward and compute what each does alone."""
    if family != "llama":
        model = load(build_family_model(family, tiny_model_dir, tmp_path / family))
    runner = runner_for(model, "growable")
    chat = Conversation(runner)
    system = prompt_of(17, 40)
    chat.admit(1, [*system, 5])
    chat.decode(1)
    chat.leave(1)
    chat.admit(9, prompt_of(30, 20))  # a row decoding meanwhile
    prompts = {key: system + prompt_of(20 + key, 3 + 4 * key) for key in range(2, 7)}
    rests = []
    for key, prompt in prompts.items():
        first = chunk(key, prompt)
        assert runner.reuse_prefix(key, first.prepared) == 32
        rests.append(chunk(key, prompt, 32))
    groups = runner._reused_groups(rests)
    assert sum(len(g) for g in groups) >= 4  # lengths 11 to 27 after the prefix
    chat.drive.run(*rests)
    chat.decode(6)
    for key, prompt in {9: prompt_of(30, 20), **prompts}.items():
        tokens = chat.drive.tokens[key]
        assert tokens == alone(model, prompt, len(tokens)), key


# -- memory ------------------------------------------------------------------------


def test_the_cpu_budget_leaves_the_cache_what_the_padded_batch_does_not_use() -> None:
    room = cpu_prefix_room(1000)
    assert room([]) == 1000
    assert room([100]) == 900
    assert room([100, 300, 50]) == 100  # padded: 3 rows x the largest, 300
    assert room([500, 500]) == 0
    assert room([600, 600]) == 0  # never negative


def fake_slabs(
    rows: int, positions: int, layers: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, keys and values [rows, heads=2, positions, dim=4] whose every element
    names its row and position (row * 1000 + position)."""
    marks = torch.arange(rows)[:, None] * 1000 + torch.arange(positions)[None, :]
    slab = marks[:, None, :, None].expand(rows, 2, positions, 4).float()
    return [(slab.clone(), -slab.clone()) for _ in range(layers)]


def test_a_leaving_row_is_stored_from_its_own_slot_and_reused_capped() -> None:
    cache = PrefixCache(1000, lambda costs: None)
    slabs = fake_slabs(rows=3, positions=64)
    tokens = prompt_of(1, 40)
    cache.store_slot(tokens, slabs, slot=2, running_costs=[])
    assert cache.index.used == 40
    reuse = cache.lookup([*tokens, 1, 2, 3])
    assert reuse is not None and reuse.tokens == 32  # whole blocks of the 40 held
    keys, values = reuse.kv.layers[0]
    assert keys.shape == (2, 40, 4)
    assert torch.equal(keys[0, :, 0], torch.arange(40).float() + 2000)  # row 2's positions
    assert torch.equal(values, -keys)
    # Exactly a block boundary away from the end: the last block is computed again,
    # since at least the last token must be.
    block = cache.lookup(tokens[:32])
    assert block is not None and block.tokens == 16
    longer = cache.lookup(tokens[:33])
    assert longer is not None and longer.tokens == 32
    # Fewer than a block in common: nothing.
    assert cache.lookup(tokens[:10] + prompt_of(2, 40)) is None


def test_running_sequences_take_back_the_cache_least_recently_used_first() -> None:
    budget = 400
    cache = PrefixCache(300, cpu_prefix_room(budget))
    slabs = fake_slabs(rows=4, positions=128)
    entries = [prompt_of(seed, 100) for seed in range(3)]
    for slot, tokens in enumerate(entries):
        cache.store_slot(tokens, slabs, slot, running_costs=[])
    assert cache.index.used == 300  # the capacity, with nothing running
    assert cache.lookup(entries[0] + [1]) is not None  # entry 0 is used again
    cache.fit([150])  # one running sequence of 150 tokens leaves 250: one entry goes
    remaining = {e.tokens for e in cache.index.entries()}
    assert tuple(entries[1]) not in remaining  # the least recently used
    assert cache.index.used == 200
    cache.fit([150, 120])  # padded: 2 x 150 = 300, leaving 100
    assert cache.index.used == 100
    cache.fit([200, 200])  # nothing left
    assert cache.index.used == 0 and len(cache.index) == 0
    # And nothing is stored while running sequences use it all.
    cache.store_slot(entries[0], slabs, 0, running_costs=[200, 200])
    assert cache.index.used == 0


def test_the_runner_evicts_for_an_admitted_sequence_before_it_runs(model: Any) -> None:
    runner, _ = build_runner(model, CPU, 0, ExecutionOptions(max_batch_tokens=600))
    assert runner.prefix is not None and runner.prefix.capacity == 150
    chat = Conversation(runner)
    chat.admit(1, prompt_of(1, 100))
    chat.decode(2)
    chat.leave(1)
    assert runner.prefix.index.used == 102
    # An admitted sequence costing 314 tokens (250 + 64 max_tokens) leaves 286: it stays.
    chat.admit(2, prompt_of(2, 250))
    assert runner.prefix.index.used == 102
    # A second one: 2 rows x 314 is more than the budget; the entry goes at admission.
    chat.admit(3, prompt_of(3, 250))
    assert runner.prefix.index.used == 0
    chat.leave(2, 3)  # longer than the whole cache: not kept
    assert runner.prefix.index.used == 0
    chat.admit(4, prompt_of(4, 60))
    chat.leave(4)
    assert runner.prefix.index.used == 60


def test_prefix_cache_off_builds_no_cache(model: Any) -> None:
    runner, ready = build_runner(model, CPU, 0, ExecutionOptions(prefix_cache=False))
    assert runner.prefix is None and "prefix-cache=off" in ready
    on, ready_on = build_runner(model, CPU, 0, ExecutionOptions())
    assert on.prefix is not None and "prefix-cache=16384 tokens" in ready_on


def test_a_reset_empties_the_cache(model: Any) -> None:
    chat = Conversation(runner_for(model, "growable"))
    chat.admit(1, prompt_of(1, 40))
    chat.decode(1)
    chat.leave(1)
    assert chat.runner.prefix is not None and chat.runner.prefix.index.used > 0
    chat.runner.reset()
    assert chat.runner.prefix.index.used == 0


def test_the_runner_forgets_an_admitted_sequence_whose_prefill_failed(model: Any) -> None:
    runner = runner_for(model, "growable")
    chat = Conversation(runner)
    chat.admit(1, prompt_of(1, 40))
    chat.decode(1)
    chat.leave(1)
    prompt = prompt_of(1, 40) + prompt_of(2, 10)
    first = chunk(2, prompt)
    assert runner.reuse_prefix(2, first.prepared) == 32
    request = GenerationRequest("bad", "tiny", "p", SamplingParams(max_tokens=4))
    broken = PreparedRequest(request, (10**6,) * 3, 4)  # a token id past the vocabulary
    runner.launch(StepPlan(50, (), False, (PrefillChunk(2, broken, 32, 35),)))
    result = runner.collect()
    assert [key for key, _ in result.failed] == [2]
    assert runner._costs == {} and runner._reuse == {}


def test_a_burst_behind_a_running_row_shares_one_copy_of_its_prefix(model: Any) -> None:
    """The first newcomer copies the prefix out of the running row's slot and keeps
    it; the others reuse that copy rather than making one each (within the budget)."""
    runner = runner_for(model, "growable")
    chat = Conversation(runner)
    system = prompt_of(18, 40)
    chat.admit(1, [*system, 7, 7])
    chat.decode(2)
    followers = {key: system + prompt_of(40 + key, 5 + key) for key in range(2, 6)}
    for key, prompt in followers.items():
        assert runner.reuse_prefix(key, chunk(key, prompt).prepared) == 32
    assert runner.prefix is not None and len(runner.prefix.index) == 1
    kept = {id(runner._reuse[key].kv) for key in followers}
    assert len(kept) == 1
    chat.drive.run(*(chunk(key, prompt, 32) for key, prompt in followers.items()))
    chat.decode(4)
    for key, prompt in followers.items():
        tokens = chat.drive.tokens[key]
        assert tokens == alone(model, prompt, len(tokens)), key


def test_a_failing_prefix_cache_never_fails_a_sequence(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keeping a leaving row's KV, or looking a prompt up, is an optimisation: when it
    fails (out of memory, say) the batch goes on and the prompt is prefilled whole."""
    runner = runner_for(model, "growable")
    assert runner.prefix is not None

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(runner.prefix, "store_slot", out_of_memory)
    chat = Conversation(runner)
    long_prompt, short_prompt = prompt_of(19, 30), prompt_of(20, 36)
    chat.admit(1, long_prompt)
    chat.admit(2, short_prompt)
    chat.decode(2)
    chat.drive.run(remove=(2,))  # its KV cannot be kept: it leaves all the same
    chat.decode(6)
    assert chat.drive.tokens[1] == alone(model, long_prompt, len(chat.drive.tokens[1]))
    monkeypatch.setattr(runner.prefix.index, "lookup", out_of_memory)
    chat.admit(3, short_prompt)
    assert chat.reused[3] == 0
    chat.decode(3)
    assert chat.drive.tokens[3] == alone(model, short_prompt, len(chat.drive.tokens[3]))
