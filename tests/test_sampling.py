"""The batched sampler: each row its own settings and seed, whatever else is in the batch."""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence

import pytest
import torch

from llm_stream.engine.types import SamplingParams
from llm_stream.model.sampling import BatchSampler, split_seed, uniforms
from llm_stream.model.slots import RowMoves

CPU = torch.device("cpu")
VOCAB = 50


def logits_rows(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, VOCAB, generator=torch.Generator().manual_seed(seed))


def params(**values: float | int | None) -> SamplingParams:
    return SamplingParams(max_tokens=10, **values)  # type: ignore[arg-type]


def sampler_for(
    rows: Sequence[SamplingParams], prompts: Sequence[Sequence[int]] | None = None
) -> BatchSampler:
    sampler = BatchSampler(len(rows), CPU)
    sampler.place(0, rows, prompts or [()] * len(rows), vocab=VOCAB)
    return sampler


def draws(sampler: BatchSampler, logits: torch.Tensor, steps: int, row: int = 0) -> list[int]:
    """``steps`` tokens of one row, at successive positions."""
    rows = sampler.rows
    out = []
    for position in range(steps):
        tokens = sampler.sample(
            logits, slice(0, rows), functools.partial(torch.full, (rows,), position)
        )
        sampler.record(tokens, slice(0, rows))
        out.append(int(tokens[row]))
    return out


def test_greedy_rows_take_the_argmax() -> None:
    logits = logits_rows(3)
    sampler = sampler_for([params(), params(), params()])
    chosen = sampler.sample(logits, slice(0, 3), lambda: torch.zeros(3, dtype=torch.long))
    assert chosen.tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_else_is_in_the_batch() -> None:
    logits = logits_rows(4)
    alone = draws(sampler_for([params(temperature=0.9, seed=42)]), logits[1:2], 20)
    mates = [params(temperature=1.3, seed=1), params(temperature=0.9, seed=42)]
    mates += [params(), params(top_k=3)]
    together = draws(sampler_for(mates), logits, 20, row=1)
    assert together == alone
    assert draws(sampler_for([params(temperature=0.9, seed=43)]), logits[1:2], 20) != alone


def test_the_draw_depends_on_seed_and_position_only() -> None:
    lo, hi = (torch.tensor([x]) for x in split_seed(2**40 + 5))
    first = uniforms(lo, hi, torch.tensor([7]))
    assert torch.equal(first, uniforms(lo, hi, torch.tensor([7])))
    assert not torch.equal(first, uniforms(lo, hi, torch.tensor([8])))
    other_lo, other_hi = (torch.tensor([x]) for x in split_seed(5))
    assert not torch.equal(first, uniforms(other_lo, other_hi, torch.tensor([7])))
    many = uniforms(lo.expand(4000), hi.expand(4000), torch.arange(4000))
    assert float(many.min()) >= 0 and float(many.max()) < 1
    assert float(many.mean()) == pytest.approx(0.5, abs=0.02)


def test_top_k_keeps_the_k_most_likely() -> None:
    logits = logits_rows(1)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    seen = set(draws(sampler_for([params(temperature=5.0, top_k=3, seed=0)]), logits, 200))
    assert seen <= allowed and len(seen) > 1


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, :3] = torch.tensor([3.0, 2.5, 2.0])  # about 0.5, 0.3, 0.2 of the mass
    sampler = sampler_for([params(temperature=1.0, top_p=0.7, seed=0)])
    seen = collections.Counter(draws(sampler, logits, 400))
    assert set(seen) == {0, 1}  # 0.5 < 0.7, and 0.5 + 0.3 reaches it: token 2 is cut


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (VOCAB - 3)]))
    seen = collections.Counter(draws(sampler_for([params(temperature=1.0, seed=3)]), logits, 2000))
    assert seen[0] / 2000 == pytest.approx(0.7, abs=0.05)
    assert seen[1] / 2000 == pytest.approx(0.2, abs=0.05)


def test_repetition_penalty_applies_to_prompt_and_generated_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6], logits[0, 7] = 3.0, 2.9, 2.8
    penalised = sampler_for([params(repetition_penalty=2.0)], [(5,)])
    assert draws(penalised, logits, 2) == [6, 7]  # 5 is in the prompt, then 6 was generated
    assert draws(sampler_for([params()]), logits, 1) == [5]


def test_rows_keep_their_settings_when_they_move() -> None:
    logits = logits_rows(3)
    sampler = sampler_for([params(), params(temperature=0.8, seed=9), params(top_k=1, seed=1)])
    expected = draws(sampler_for([params(temperature=0.8, seed=9)]), logits[1:2], 5)
    # Row 0 leaves: row 2 moves into its slot, row 1 stays.
    sampler.move(RowMoves([(0, 2)], torch.tensor([0]), torch.tensor([2])))
    sampler.clear(slice(2, 3))
    assert draws(sampler, logits, 5, row=1) == expected


def test_a_vanishing_temperature_stays_finite() -> None:
    logits = logits_rows(1)
    sampler = sampler_for([params(temperature=1e-30, seed=0)])
    assert draws(sampler, logits, 3) == [int(logits.argmax())] * 3
