"""The batched sampler: each row its own settings and seed, whatever else is in the batch."""

from __future__ import annotations

import collections

import pytest
import torch

from llm_stream.engine.types import SamplingParams
from llm_stream.model.sampling import RowSampler, choose_tokens, make_row_sampler

CPU = torch.device("cpu")
VOCAB = 50


def logits_rows(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, VOCAB, generator=torch.Generator().manual_seed(seed))


def row(prompt: tuple[int, ...] = (), **params: float | int | None) -> RowSampler:
    return make_row_sampler(SamplingParams(max_tokens=10, **params), prompt, CPU)  # type: ignore[arg-type]


def test_greedy_rows_take_the_argmax() -> None:
    logits = logits_rows(3)
    assert choose_tokens(logits, [row(), row(), row()]) == logits.argmax(-1).tolist()


def draws(sampler: RowSampler, logits: torch.Tensor, steps: int) -> list[int]:
    return [choose_tokens(logits, [sampler])[0] for _ in range(steps)]


def test_same_seed_same_tokens_whatever_else_is_in_the_batch() -> None:
    logits = logits_rows(4)
    alone = draws(row(temperature=0.9, seed=42), logits[1:2], 20)
    mates = [row(temperature=1.3, seed=1), row(temperature=0.9, seed=42), row(), row(top_k=3)]
    together = [choose_tokens(logits, mates)[1] for _ in range(20)]
    assert together == alone
    assert draws(row(temperature=0.9, seed=43), logits[1:2], 20) != alone


def test_top_k_keeps_the_k_most_likely() -> None:
    logits = logits_rows(1)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    seen = set(draws(row(temperature=5.0, top_k=3, seed=0), logits, 200))
    assert seen <= allowed and len(seen) > 1


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, :3] = torch.tensor([3.0, 2.5, 2.0])  # about 0.5, 0.3, 0.2 of the mass
    seen = collections.Counter(draws(row(temperature=1.0, top_p=0.7, seed=0), logits, 400))
    assert set(seen) == {0, 1}  # 0.5 < 0.7, and 0.5 + 0.3 reaches it: token 2 is cut


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (VOCAB - 3)]))
    seen = collections.Counter(draws(row(temperature=1.0, seed=3), logits, 2000))
    assert seen[0] / 2000 == pytest.approx(0.7, abs=0.05)
    assert seen[1] / 2000 == pytest.approx(0.2, abs=0.05)


def test_repetition_penalty_applies_to_prompt_and_generated_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 6], logits[0, 7] = 3.0, 2.9, 2.8
    penalised = row(prompt=(5,), repetition_penalty=2.0)
    assert choose_tokens(logits, [penalised]) == [6]  # 5 is in the prompt
    assert choose_tokens(logits, [penalised]) == [7]  # and 6 was just generated
    assert choose_tokens(logits, [row()]) == [5]


def test_a_vanishing_temperature_stays_finite() -> None:
    logits = logits_rows(1)
    assert draws(row(temperature=1e-30, seed=0), logits, 3) == [int(logits.argmax())] * 3
