"""The CUDA path: graphs replayed every decode step, no host sync inside a step.

Run only where CUDA is (``pytest -m gpu``); skipped elsewhere, CI included. The
tiny model runs in bf16, with the static slots and graph buckets the server
builds on a GPU. bf16 products are not batch-invariant, so the graph path is
compared with the eager forward of the same bucket (the same kernels: exactly
equal tokens), and with transformers' own decode of each row alone within a
stated tolerance: the first token where they differ must be a near tie there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from llm_stream.engine.scheduler import BatchLimits, Scheduler, StepOutput
from llm_stream.engine.sequence import Sequence
from llm_stream.engine.types import (
    FinishReason,
    GenerationRequest,
    JsonConstraint,
    PrefillChunk,
    PreparedRequest,
    SamplingParams,
    StepPlan,
)
from llm_stream.errors import ModelLoadError
from llm_stream.model.cuda_graphs import DecodeGraphs
from llm_stream.model.execution import (
    ExecutionOptions,
    SlotBudget,
    build_runner,
    capture_graphs,
    static_runner,
)
from llm_stream.model.guided import Grammars, logits_width
from llm_stream.model.prefix_cache import PrefixCache
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.slots import probe_layers
from llm_stream.model.support import attention_implementation
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import cancel_after, prompt_request, running_server, tiny_settings
from tests.model_families import build_family_model
from tests.test_guided_decoding import PERSON

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
# The first token where the graph path and a row decoded alone differ must be one
# whose top two logits, alone, are within this much of each other (bf16 rounding).
NEAR_TIE = 0.05


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    return loaded.to(CUDA).eval()


def runner_for(model: Any, *, captured: bool, rows: int = 16) -> HFStepRunner:
    runner = static_runner(
        model,
        CUDA,
        0,
        probe_layers(model, CUDA),
        rows=rows,
        budget=SlotBudget(1023, "test"),
    )
    if captured:
        capture_graphs(runner, CUDA, ExecutionOptions(max_rows=rows))
        assert runner.graphs is not None and len(runner.graphs) == 5 * 3
        assert runner.chunk_graphs is not None and len(runner.chunk_graphs) == 5 * 3
    return runner


def chunk(
    key: int, prompt: list[int], start: int = 0, end: int | None = None, **sampling: Any
) -> PrefillChunk:
    request = GenerationRequest(f"r{key}", "tiny", "p", SamplingParams(max_tokens=64, **sampling))
    return PrefillChunk(key, PreparedRequest(request, tuple(prompt), 64), start, end or len(prompt))


PROMPTS = {key: [(key * 11 + i) % 300 + 3 for i in range(5 + key * 3)] for key in range(1, 12)}
PROMPTS[12] = [(i * 7) % 300 + 3 for i in range(240)]
SEEDED = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 5}


def plan_script() -> Iterator[StepPlan]:
    """Rows join (whole, padded together, chunked), leave, and cross bucket sizes."""
    steps = [
        ((), False, (chunk(1, PROMPTS[1]),)),
        ((), True, (chunk(2, PROMPTS[2], **SEEDED), chunk(3, PROMPTS[3]))),
        ((), True, tuple(chunk(k, PROMPTS[k]) for k in range(4, 11))),  # 10 rows: bucket 16
        ((2,), True, (chunk(12, PROMPTS[12], 0, 100),)),
        ((), True, (chunk(12, PROMPTS[12], 100),)),
        ((5, 1), True, (chunk(11, PROMPTS[11], **SEEDED),)),
        *[((), True, ())] * 24,  # the long row passes 256 positions: the next width bucket
        ((3, 4, 6, 7, 8, 9), True, ()),  # back to 4 rows
        *[((), True, ())] * 4,
    ]
    for step, (remove, decode, prefill) in enumerate(steps, 1):
        yield StepPlan(step, remove, decode, prefill)


def drive(runner: HFStepRunner) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for plan in plan_script():
        runner.launch(plan)
        result = runner.collect()
        assert not result.failed, result.failed
        for key, token in result.tokens:
            tokens.setdefault(key, []).append(token)
    return tokens


def test_graph_replay_gives_the_tokens_of_the_same_eager_step(model: Any) -> None:
    graphs, eager = (
        drive(runner_for(model, captured=True)),
        drive(runner_for(model, captured=False)),
    )
    assert graphs == eager
    assert len(graphs) == 12 and sum(map(len, graphs.values())) > 150


@torch.inference_mode()
def alone(model: Any, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([prompt], device=CUDA), cache=cache).logits[0, -1]
    tokens, seen = [int(logits.argmax())], [logits.float()]
    for _ in range(steps - 1):
        ids = torch.tensor([[tokens[-1]]], device=CUDA)
        logits = model(input_ids=ids, cache=cache).logits[0, -1]
        tokens.append(int(logits.argmax()))
        seen.append(logits.float())
    return tokens, seen


def test_greedy_rows_follow_their_own_decode_up_to_a_near_tie(model: Any) -> None:
    assert_greedy_rows_follow_alone(model, drive(runner_for(model, captured=True)))


# Dense families whose decode must capture; MoE ones may fall back to eager decode
# (their expert routing can sync), and must still be right.
GRAPH_FAMILIES = {"mistral-window": True, "gemma3": True, "cohere2": True, "gpt-oss": False}


@pytest.mark.parametrize("family", list(GRAPH_FAMILIES))
def test_windowed_and_hybrid_families_follow_their_own_decode_in_bf16(
    family: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    folder = build_family_model(family, tiny_model_dir, tmp_path / family)
    config = AutoConfig.from_pretrained(str(folder))
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.bfloat16, attn_implementation=attention_implementation(config)
    )
    windowed = loaded.to(CUDA).eval()
    runner = runner_for(windowed, captured=False)
    report = capture_graphs(runner, CUDA, ExecutionOptions(max_rows=16))
    if GRAPH_FAMILIES[family]:
        assert "failed" not in report and runner.graphs is not None, report
    assert_greedy_rows_follow_alone(windowed, drive(runner))


def assert_greedy_rows_follow_alone(model: Any, tokens: dict[int, list[int]]) -> None:
    """Each greedy row equals the prompt decoded alone up to its first near-tie."""
    for key, got in tokens.items():
        if key in (2, 11):  # sampled rows
            continue
        expected, logits = alone(model, PROMPTS[key], len(got))
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            if a != b:
                top = torch.topk(logits[index], 2).values
                gap = float(top[0] - top[1])
                assert gap <= NEAR_TIE, (key, index, gap)
                break


def test_a_decode_step_never_waits_for_the_device(model: Any) -> None:
    """A decode, greedy or sampled, rows leaving, and a prompt fed in the staging slot
    never wait for the device: the step's one device-to-host copy is waited for in
    collect(). (Only the eager prefill, for a prompt that finds the slot busy, may.)"""
    runner = runner_for(model, captured=True)
    runner.launch(StepPlan(1, (), False, tuple(chunk(k, PROMPTS[k], **SEEDED) for k in (1, 2))))
    runner.launch(StepPlan(2, (), False, tuple(chunk(k, PROMPTS[k]) for k in (3, 4, 5))))
    runner.collect()
    runner.collect()
    torch.cuda.synchronize()
    for step in range(3, 10):
        joining = (chunk(10 + step, PROMPTS[step]),) if step in (5, 8) else ()
        torch.cuda.set_sync_debug_mode("error")
        try:
            runner.launch(StepPlan(step, (3,) if step == 6 else (), True, joining))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if step > 3:  # the previous step, collected while this one runs
            assert len(runner.collect().tokens) >= 4
    runner.collect()


async def test_the_server_captures_graphs_and_streams_from_them(
    tiny_model_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(
        tiny_model_dir, cache_dir, device="cuda", max_concurrent=8, max_batch_tokens=8 * 512
    )
    async with running_server(settings) as running:
        backend = running.server.engine.backend_for("")
        assert "cuda-graphs=" in backend.execution and "failed" not in backend.execution
        assert "kv=8x511" in backend.execution
        replies = [
            running.stub.Predict(prompt_request(f"Hello {i}", max_tokens=5 + 7 * i))
            for i in range(12)
        ]
        results = [await r for r in replies]
        assert [r.usage.completion_tokens for r in results] == [5 + 7 * i for i in range(12)]
        # A sequence longer than a row's slot is refused, naming what sets the slot.
        too_long = prompt_request("Hello", max_tokens=600)
        with pytest.raises(Exception, match="KV slot") as raised:
            await running.stub.Predict(too_long)
        assert "INVALID_ARGUMENT" in str(raised.value)
        stream = running.stub.StreamPredict(prompt_request("Hello world", max_tokens=400))
        tokens = [t async for t in stream]
        assert tokens[-1].is_final and tokens[-1].usage.completion_tokens == 400


async def test_a_cancel_frees_the_row_within_one_step(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, device="cuda", max_concurrent=8)
    async with running_server(settings) as running:
        record = await cancel_after(running, "gpu-cancel", 20)
        assert record.steps_after_cancel is not None and record.steps_after_cancel <= 1
        reply = await running.stub.Predict(prompt_request("again", max_tokens=4))
        assert reply.usage.completion_tokens == 4 and isinstance(reply, pb.PredictResponse)


def test_out_of_memory_at_capture_is_a_clear_start_up_error(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Last in this file: it fills the GPU's memory for a moment."""
    real = DecodeGraphs.capture

    def starved(self: DecodeGraphs, device: torch.device, pool: Any) -> Any:
        ballast = []
        for size in (2**30, 2**24, 2**20):
            while True:
                try:
                    ballast.append(torch.empty(size, dtype=torch.uint8, device=device))
                except torch.OutOfMemoryError:
                    break
        try:
            return real(self, device, pool)
        finally:
            ballast.clear()
            torch.cuda.empty_cache()

    monkeypatch.setattr(DecodeGraphs, "capture", starved)
    with pytest.raises(ModelLoadError, match="out of GPU memory capturing"):
        build_runner(model, CUDA, 0, ExecutionOptions(max_rows=4, max_batch_tokens=4 * 1024))


def test_a_reused_prefix_on_the_graphs_follows_its_own_decode(model: Any) -> None:
    """The prefix cache on the GPU layout: a leaving row's KV is kept; the next turn (the
    prompt, part of the answer, new tokens) copies it into the staging slot and replays
    the chunk graphs from there; another finds the slot busy and reuses it eagerly."""
    runner = runner_for(model, captured=True)
    runner.prefix = PrefixCache(4096, lambda costs: None)
    first = PROMPTS[12][:120]
    tokens: dict[int, list[int]] = {}

    def run(step: int, remove: tuple[int, ...], decode: bool, *chunks: PrefillChunk) -> None:
        runner.launch(StepPlan(step, remove, decode, chunks))
        result = runner.collect()
        assert not result.failed, result.failed
        for key, token in result.tokens:
            tokens.setdefault(key, []).append(token)

    run(1, (), False, chunk(1, first))
    for step in range(2, 12):
        run(step, (), True)
    run(12, (1,), False)
    turn = first + tokens[1][:6] + PROMPTS[9]
    busy = PROMPTS[12]
    other = first + PROMPTS[10]
    assert runner.reuse_prefix(2, chunk(2, turn).prepared) == 112  # 126 held: 7 blocks
    run(13, (), False, chunk(2, turn, 112))  # staged, from the cached prefix
    run(14, (), True, chunk(3, busy, 0, 100))  # holds the staging slot
    assert runner.reuse_prefix(4, chunk(4, other).prepared) == 112
    run(15, (), True, chunk(3, busy, 100), chunk(4, other, 112))  # 4 goes eager
    for step in range(16, 30):
        run(step, (), True)
    for key, prompt in ((2, turn), (3, busy), (4, other)):
        expected, logits = alone(model, prompt, len(tokens[key]))
        for index, (a, b) in enumerate(zip(tokens[key], expected, strict=True)):
            if a != b:
                top = torch.topk(logits[index], 2).values
                assert float(top[0] - top[1]) <= NEAR_TIE, (key, index)
                break


def test_guided_rows_mask_outside_the_graphs_and_pipeline_safely(
    model: Any, tiny_model_dir: Path
) -> None:
    """Constrained rows beside free ones on the captured graphs, driven by the real
    scheduler (which pipelines one step ahead on a GPU): the runner reports depth 0
    while a constrained row needs each token before its next mask, every constrained
    row ends in schema-valid JSON, graphs and eager steps choose the same tokens, and
    masking a decode step never waits for the device."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    eos = frozenset({int(tokenizer.eos_token_id)})
    guide = Grammars("tiny", tokenizer, logits_width(model), eos).compile(
        JsonConstraint(json.dumps(PERSON))
    )

    def prepared(key: int, guided: bool, **sampling: Any) -> PreparedRequest:
        params = SamplingParams(max_tokens=300, **sampling)
        request = GenerationRequest(f"r{key}", "tiny", "p", params)
        grammar = guide if guided else None
        return PreparedRequest(request, tuple(PROMPTS[key]), 300, eos, grammar=grammar)

    def run(runner: HFStepRunner) -> tuple[dict[int, list[int]], list[int]]:
        tokens: dict[int, list[int]] = {}

        def deliver(outputs: list[StepOutput]) -> None:
            for output in outputs:
                tokens.setdefault(output.key, []).extend(output.token_ids)

        scheduler = Scheduler(runner, BatchLimits(max_rows=16), deliver)
        sequences = [
            Sequence(prepared(k, k <= 4, **(SEEDED if k in (2, 3) else {}))) for k in range(1, 9)
        ]
        scheduler.submit(*sequences[:6])
        depths = []
        for step in range(400):
            if step == 5:
                scheduler.submit(*sequences[6:])  # free rows join mid-batch
            if all(s.finished for s in sequences):
                break
            scheduler.step()
            depths.append(runner.pipeline_depth)
        by_prompt = {k: tokens[s.key] for k, s in enumerate(sequences, 1)}
        for k, sequence in enumerate(sequences[:4], 1):
            assert sequence.finish_reason is FinishReason.END_OF_SEQUENCE
            text = tokenizer.decode(by_prompt[k][:-1])
            jsonschema.validate(json.loads(text), PERSON)
        return by_prompt, depths

    captured, depths = run(runner_for(model, captured=True))
    assert depths[0] == 0 and depths[-1] == 1  # constrained rows in, then all gone
    eager, _ = run(runner_for(model, captured=False))
    assert captured == eager

    runner = runner_for(model, captured=True)
    runner.launch(StepPlan(1, (), False, (PrefillChunk(1, prepared(1, True), 0, len(PROMPTS[1])),)))
    runner.collect()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.launch(StepPlan(2, (), True, ()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(runner.collect().tokens) == 1
