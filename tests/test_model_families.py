"""The family matrix: every family the README lists serves, token for token.

One server holds a tiny random model of each family (tests/model_families.py),
with prompts longer than the 16-token sliding window and a prefill chunk of 32
tokens, so every prompt here is fed in chunks. For each family: greedy tokens
equal transformers' own ``generate`` of the same model, alone and inside a busy
batch with rows joining and leaving; a seeded sample is the same alone and in a
batch; a prompt that repeats or continues an earlier one (its KV from the prefix
cache) still equals ``generate``. "Equal" is up to a near-tie: where two logits
of ``generate`` are all but level, another order of fp32 sums may pick either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import (
    RunningServer,
    collect_stream,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.model_families import FAMILIES, build_family_model
from tests.tiny_model import CORPUS

NEW_TOKENS = 24
# Different lengths, every one past the window and the 32-token prefill chunk.
PROMPTS = [" ".join(CORPUS[:3]), " ".join(CORPUS[1:4]), " ".join(CORPUS[2:6]) * 2]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family_model(name, tiny_model_dir, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
async def families_server(
    family_dirs: dict[str, Path], cache_dir: Path
) -> AsyncIterator[RunningServer]:
    settings = tiny_settings(
        family_dirs["llama"],
        cache_dir,
        models=tuple(f"{name}={folder}" for name, folder in family_dirs.items()),
        max_concurrent=8,
        prefill_chunk=32,
        default_max_tokens=NEW_TOKENS,
    )
    async with running_server(settings) as running:
        yield running


# A step whose two best logits lie closer than this is a near-tie: fp32 sums taken in
# another order (a batch, a chunked or cached prefill) may pick either token there.
NEAR_TIE = 1e-3


@dataclass(frozen=True)
class Greedy:
    """transformers' greedy tokens, and at each step the lead of the best logit."""

    tokens: list[int]
    margins: list[float]


@torch.inference_mode()
def generate_alone(folder: Path, prompts: list[str]) -> list[Greedy]:
    """transformers' own greedy generate of the model, each prompt alone, with its own cache."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        margins = [float(top[0] - top[1]) for top in (s[0].topk(2).values for s in out.scores)]
        results.append(Greedy([int(t) for t in out.sequences[0, ids.shape[1] :]], margins))
    return results


def assert_follows(got: list[int], expected: Greedy, what: str, length: int | None = None) -> None:
    """``got`` is ``expected``'s first ``length`` tokens, up to a near-tie: where they part,
    transformers' own two best logits must be within NEAR_TIE (seen: a random llama's
    tokens 333 and 386, 0.0 apart, at step 20), and nothing after that is compared."""
    want = expected.tokens[:length]
    for step, (mine, theirs) in enumerate(zip(got, want, strict=False)):
        if mine != theirs:
            margin = expected.margins[step]
            assert margin < NEAR_TIE, (
                f"{what}: token {step} is {mine}, not {theirs} (a lead of {margin:.4f}); "
                f"got {got}, expected {want}"
            )
            return
    assert len(got) == len(want), f"{what}: got {got}, expected {want}"


def request(family: str, prompt: str, **config: Any) -> pb.PredictRequest:
    config.setdefault("max_tokens", NEW_TOKENS)
    message = prompt_request(prompt, apply_chat_template=False, **config)
    message.model_id = family
    return message


async def token_ids(running: RunningServer, message: pb.PredictRequest) -> list[int]:
    return (await stream_of(running, message))[0]


async def stream_of(
    running: RunningServer, message: pb.PredictRequest
) -> tuple[list[int], str, int]:
    """Token ids, text and cached prompt tokens of a streamed generation."""
    tokens = await collect_stream(running.stub, message)
    assert tokens[-1].is_final
    ids = [t.token_id for t in tokens if not t.is_final]
    return ids, "".join(t.token for t in tokens), tokens[-1].usage.cached_prompt_tokens


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_greedy_tokens_equal_generate_alone_and_in_a_busy_batch(
    family: str, families_server: RunningServer, family_dirs: dict[str, Path]
) -> None:
    expected = generate_alone(family_dirs[family], PROMPTS)
    alone = await token_ids(families_server, request(family, PROMPTS[0]))
    assert_follows(alone, expected[0], f"{family} ({FAMILIES[family][0]}) alone")

    async def later(delay: float, index: int, **config: Any) -> list[int]:
        await asyncio.sleep(delay)
        return await token_ids(families_server, request(family, PROMPTS[index], **config))

    # Rows join while others decode, and a short one leaves early.
    busy = await asyncio.gather(
        later(0, 2),
        later(0.005, 1),
        later(0.01, 0, max_tokens=5),
        later(0.02, 0),
        later(0.03, 1, max_tokens=3),
    )
    assert_follows(busy[0], expected[2], f"{family}: the longest prompt in a batch")
    assert_follows(busy[1], expected[1], f"{family}: joined a decoding batch")
    assert_follows(busy[2], expected[0], f"{family}: left early", length=5)
    assert_follows(busy[3], expected[0], f"{family}: joined as another row left")
    assert_follows(busy[4], expected[1], f"{family}: left early", length=3)


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(
    family: str, families_server: RunningServer
) -> None:
    sampled = {"temperature": 0.9, "top_p": 0.95, "seed": 11}
    alone = await token_ids(families_server, request(family, PROMPTS[1], **sampled))
    batch = await asyncio.gather(
        token_ids(families_server, request(family, PROMPTS[2])),
        token_ids(families_server, request(family, PROMPTS[1], **sampled)),
        token_ids(families_server, request(family, PROMPTS[0], temperature=0.7, seed=3)),
    )
    assert batch[1] == alone


@pytest.mark.parametrize("family", list(FAMILIES))
async def test_prompts_that_repeat_or_continue_another_reuse_its_kv_token_for_token(
    family: str, families_server: RunningServer, family_dirs: dict[str, Path]
) -> None:
    """The prefix cache on every family: the same prompt again, then the next "turn" (the
    prompt, the answer's text and more), each equal to ``generate`` of the whole prompt;
    far longer than the window, so windowed layers must see only their window."""
    base = PROMPTS[2] + f" {family}"
    first, text, _ = await stream_of(families_server, request(family, base))
    again, _, cached = await stream_of(families_server, request(family, base))
    assert again == first
    assert cached >= 2 * 16, f"{family}: the repeated prompt was not reused"
    continued = base + text + " " + CORPUS[0]
    expected = generate_alone(family_dirs[family], [base, continued])
    assert_follows(first, expected[0], f"{family}: the first prompt")
    follow_up, _, cached = await stream_of(families_server, request(family, continued))
    assert cached >= 2 * 16, f"{family}: the continued prompt was not reused"
    assert_follows(follow_up, expected[1], f"{family}: the continued prompt")
