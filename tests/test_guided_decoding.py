"""Guided decoding: a constrained row's output always parses and matches its schema.

On the tiny random-weight model (whose free output is noise) and on the default
model, through the real backend, runner and scheduler. Most tests drive the
scheduler on the test's own thread, step by step, so that rows join and leave at
chosen steps and every run is deterministic: seeded rows draw the same numbers
whatever else is in the batch, and greedy rows take the argmax of the same
logits. Strings in the schemas carry ``maxLength`` and numbers bounds, so random
weights close their JSON within a few dozen tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from llm_stream.engine.engine import Engine, EngineState
from llm_stream.engine.scheduler import BatchLimits, Scheduler, StepOutput
from llm_stream.engine.sequence import Sequence
from llm_stream.engine.types import (
    FinishReason,
    GenerationRequest,
    JsonConstraint,
    SamplingParams,
)
from llm_stream.errors import InvalidRequestError
from llm_stream.model.backend import HFBackend
from llm_stream.model.execution import SlotBudget, static_runner
from llm_stream.model.guided import GRAMMAR_CACHE_SIZE, Grammars, pack_bits, stop_only
from llm_stream.model.loader import load_backend
from llm_stream.model.runner import HFStepRunner
from llm_stream.model.slots import probe_layers
from llm_stream.model.sources import ModelSpec, embedded_gguf_path, parse_model_spec
from llm_stream.settings import default_cache_dir

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 4},
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9},
                "ok": {"type": "boolean"},
                "role": {"enum": ["admin", "user"]},
            },
            "required": ["id", "ok"],
        },
    },
    "required": ["name", "kind", "owner"],
}
ANY_OBJECT = {"type": "object"}
# What the faces send for a forced tool call (tool_choice "required" or named).
TOOL_CALLS = {
    "type": "array",
    "minItems": 1,
    "maxItems": 2,
    "items": {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Tokyo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
            },
        },
        "required": ["name", "arguments"],
    },
}
SEEDS = (1, 2, 3, 4)
CPU = torch.device("cpu")


def constraint(schema: dict[str, Any] | None) -> JsonConstraint:
    return JsonConstraint("" if schema is None else json.dumps(schema))


def request(
    prompt: str,
    schema: dict[str, Any] | None = PERSON,
    *,
    guided: bool = True,
    max_tokens: int = 250,
    **sampling: Any,
) -> GenerationRequest:
    return GenerationRequest(
        f"req-{prompt}",
        "",
        prompt,
        SamplingParams(max_tokens=max_tokens, max_tokens_explicit=True, **sampling),
        constraint=constraint(schema) if guided else None,
    )


def assert_valid(text: str, schema: dict[str, Any] | None) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, ANY_OBJECT if schema is None else schema)
    return value


@pytest.fixture
def backend(tiny_model_dir: Path, cache_dir: Path) -> HFBackend:
    """A fresh tiny model with its own runner (a test may change its pipelining)."""
    return load_backend(parse_model_spec(f"tiny={tiny_model_dir}"), "cpu", "auto", cache_dir)


class Stepper:
    """The real scheduler on the test's thread: submit sequences, run steps, read text."""

    def __init__(
        self,
        backend: HFBackend,
        runner: HFStepRunner | None = None,
        limits: BatchLimits | None = None,
    ) -> None:
        self.backend = backend
        self.runner = runner or backend.new_runner()
        self.scheduler = Scheduler(self.runner, limits or BatchLimits(max_rows=16), self._deliver)
        self.sequences: dict[int, Sequence] = {}
        self.tokens: dict[int, list[int]] = {}
        self.depths: list[int] = []

    def _deliver(self, outputs: list[StepOutput]) -> None:
        for output in outputs:
            self.tokens.setdefault(output.key, []).extend(output.token_ids)

    def submit(self, *requests: GenerationRequest) -> list[int]:
        sequences = [Sequence(self.backend.prepare(r)) for r in requests]
        self.scheduler.submit(*sequences)
        for sequence in sequences:
            self.sequences[sequence.key] = sequence
        return [s.key for s in sequences]

    def step(self, count: int = 1) -> None:
        for _ in range(count):
            self.scheduler.step()
            self.depths.append(self.runner.pipeline_depth)

    def finish(self, keys: Iterable[int] | None = None, limit: int = 2000) -> None:
        """Step until these sequences (every one submitted: None) have ended."""
        waited = [self.sequences[k] for k in keys] if keys is not None else None
        for _ in range(limit):
            if all(s.finished for s in waited or self.sequences.values()):
                return
            self.step()
        raise AssertionError("sequences still running after the step limit")

    def text(self, key: int) -> str:
        sequence = self.sequences[key]
        assembler = self.backend.text_assembler(sequence.prepared)
        for token in self.tokens.get(key, []):
            assembler.add(token)
        return assembler.text

    def reason(self, key: int) -> FinishReason | None:
        return self.sequences[key].finish_reason


# -- the tiny random model -------------------------------------------------------------


@pytest.mark.parametrize("schema", [PERSON, TOOL_CALLS], ids=["nested", "tool-calls"])
def test_random_weights_give_schema_valid_json_greedy_and_sampled(
    backend: HFBackend, schema: dict[str, Any]
) -> None:
    steps = Stepper(backend)
    keys = steps.submit(
        request("Hello", schema),
        *(request("Hello", schema, temperature=1.0, seed=s) for s in SEEDS),
        request("Bonjour", schema, temperature=1.0, top_k=20, top_p=0.9, seed=7),
        request("Hallo", schema, temperature=0.7, repetition_penalty=1.3, seed=8),
    )
    steps.finish()
    texts = []
    for key in keys:
        assert steps.reason(key) is FinishReason.END_OF_SEQUENCE, steps.text(key)
        assert_valid(steps.text(key), schema)
        texts.append(steps.text(key))
    assert len(set(texts)) >= 4, texts  # the seeds drew different documents


def test_any_object_from_random_weights(backend: HFBackend) -> None:
    """An empty schema: any JSON object. Random weights ramble inside strings (nothing
    bounds them), so some rows run out of tokens; every row that ends is an object."""
    steps = Stepper(backend)
    keys = steps.submit(
        *(request("Hello", None, max_tokens=150, temperature=1.0, seed=s) for s in range(8))
    )
    steps.finish()
    ended = [k for k in keys if steps.reason(k) is FinishReason.END_OF_SEQUENCE]
    assert len(ended) >= 3, [steps.reason(k) for k in keys]
    objects = [assert_valid(steps.text(key), None) for key in ended]
    assert all(isinstance(o, dict) for o in objects) and any(objects), objects
    for key in set(keys) - set(ended):
        assert steps.reason(key) is FinishReason.LENGTH
        assert steps.text(key).startswith("{")


def test_free_rows_are_unchanged_by_a_constrained_row_beside_them(backend: HFBackend) -> None:
    free = [request(p, guided=False, max_tokens=30) for p in ("Hello", "Streaming", "日本語")]
    alone = Stepper(backend)
    alone_keys = alone.submit(*free)
    alone.finish()
    mixed = Stepper(backend)
    guided_key, *mixed_keys = mixed.submit(request("Hello"), *free)
    mixed.finish()
    for a, b in zip(alone_keys, mixed_keys, strict=True):
        assert mixed.tokens[b] == alone.tokens[a]
    assert_valid(mixed.text(guided_key), PERSON)
    # Free text from random weights is not JSON: the constraint made the difference.
    with pytest.raises(ValueError):
        json.loads(mixed.text(mixed_keys[0]))


def test_rows_join_and_leave_mid_batch(backend: HFBackend) -> None:
    """Constrained rows join while others decode, free rows leave and move constrained
    rows into their slots, and each constrained row's text still matches its schema."""
    steps = Stepper(backend)
    first = steps.submit(
        request("Hello", guided=False, max_tokens=5),
        request("Hello", seed=1, temperature=1.0),
        request("Streaming", guided=False, max_tokens=9),
    )
    steps.step(3)
    second = steps.submit(
        request("Bonjour", TOOL_CALLS),
        request("Emoji", guided=False, max_tokens=4),
        request("Hallo", None, max_tokens=12),  # too short to close: LENGTH
    )
    steps.step(4)
    third = steps.submit(request("The quick", seed=2, temperature=1.0))
    steps.finish()
    assert steps.reason(first[0]) is FinishReason.LENGTH
    assert_valid(steps.text(first[1]), PERSON)
    assert_valid(steps.text(second[0]), TOOL_CALLS)
    assert steps.reason(second[2]) is FinishReason.LENGTH
    assert steps.text(second[2]).startswith("{")
    assert_valid(steps.text(third[0]), PERSON)


def test_prompts_fed_in_chunks_are_constrained_from_their_first_token(
    backend: HFBackend,
) -> None:
    steps = Stepper(backend, limits=BatchLimits(max_rows=16, prefill_chunk=4))
    steps.submit(request("Hello", guided=False, max_tokens=40))
    steps.step(2)
    long_prompt = "Streaming tokens to chat frontends over gRPC, one token at a time. " * 2
    (key,) = steps.submit(request(long_prompt, temperature=1.0, seed=3))
    steps.finish()
    assert_valid(steps.text(key), PERSON)


def test_a_pipelined_runner_waits_for_each_token_of_a_constrained_row(
    backend: HFBackend,
) -> None:
    """As on a GPU (pipeline depth 1), the scheduler launches step N+1 before it collects
    step N; a constrained row's mask needs token N, so the runner reports depth 0 while
    one is in the batch, and 1 again once it has left."""
    steps = Stepper(backend)
    steps.runner.pipeline_depth = 1
    (free,) = steps.submit(request("Hello", guided=False, max_tokens=1000))
    steps.step(2)
    assert steps.depths == [1, 1]
    keys = steps.submit(*(request("Hello", temperature=1.0, seed=s) for s in SEEDS))
    steps.finish(keys)
    for key in keys:
        assert steps.reason(key) is FinishReason.END_OF_SEQUENCE
        assert_valid(steps.text(key), PERSON)
    assert 0 in steps.depths
    steps.step(3)  # the finished rows leave; the free row pipelines again
    assert steps.depths[-1] == 1
    assert not steps.sequences[free].finished


def test_the_gpu_layout_on_the_cpu(backend: HFBackend) -> None:
    """The GPU's runner, uncaptured, on the CPU: fixed slots, prompts fed in the staging
    slot, decode by (rows, width) bucket, and one step in flight; its guided rows are
    valid and its free rows unchanged by them."""

    def gpu_like() -> HFStepRunner:
        model = backend._model
        layers = probe_layers(model, CPU)
        runner = static_runner(model, CPU, 0, layers, rows=8, budget=SlotBudget(511, "test"))
        runner.pipeline_depth = 1
        return runner

    free = [request(p, guided=False, max_tokens=300) for p in ("Hello", "Streaming")]
    alone = Stepper(backend, gpu_like())
    alone_keys = alone.submit(*free)
    alone.finish()
    steps = Stepper(backend, gpu_like())
    guided = steps.submit(request("Hello"), request("Hallo", TOOL_CALLS, temperature=1.0, seed=2))
    steps.step(2)
    mixed_keys = steps.submit(*free)
    steps.finish(guided)
    assert_valid(steps.text(guided[0]), PERSON)
    assert_valid(steps.text(guided[1]), TOOL_CALLS)
    assert set(steps.depths) == {0}
    steps.step(2)  # the guided rows leave: the free rows pipeline again
    assert steps.depths[-1] == 1
    steps.finish()
    for a, b in zip(alone_keys, mixed_keys, strict=True):
        assert steps.tokens[b] == alone.tokens[a]


def test_too_few_tokens_end_with_length(backend: HFBackend) -> None:
    steps = Stepper(backend)
    (key,) = steps.submit(request("Hello", max_tokens=5))
    steps.finish()
    assert steps.reason(key) is FinishReason.LENGTH
    assert len(steps.tokens[key]) == 5 and steps.text(key).startswith("{")


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"string"', "must be a JSON object"),
        ('{"type": "strin"}', 'Unsupported type "strin"'),
        ('{"type": "string", "minLength": "x"}', "minLength"),
        ('{"$ref": "#/$defs/missing"}', "missing"),
    ],
)
def test_an_invalid_schema_is_an_invalid_request(
    backend: HFBackend, schema: str, message: str
) -> None:
    bad = GenerationRequest(
        "bad", "", "Hello", SamplingParams(max_tokens=8), constraint=JsonConstraint(schema)
    )
    with pytest.raises(InvalidRequestError, match="JSON schema") as raised:
        backend.prepare(bad)
    assert message in str(raised.value)
    assert "cpp" not in str(raised.value) and "Check failed" not in str(raised.value)


def test_compiled_grammars_are_kept_by_schema_text(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    grammars = Grammars("tiny", AutoTokenizer.from_pretrained(str(tiny_model_dir)), 400, {2})
    first = grammars.compile(constraint(PERSON))
    assert grammars.compile(constraint(PERSON)) is first
    for size in range(GRAMMAR_CACHE_SIZE):
        grammars.compile(constraint({"type": "array", "maxItems": size + 1}))
    assert grammars.compile(constraint(PERSON)) is not first  # evicted, compiled again


def test_bitmask_rows_follow_xgrammars_bit_order() -> None:
    """Token i is bit i % 32 of word i // 32, the top bit of a word included."""
    allowed = torch.zeros(96, dtype=torch.bool)
    allowed[[0, 31, 32, 95]] = True
    packed = pack_bits(allowed)
    row = torch.empty(3, dtype=torch.int32)
    stop_only(row, [0, 31, 32, 95])
    assert torch.equal(packed, row)
    unpacked = (row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    assert unpacked.view(-1).nonzero().flatten().tolist() == [0, 31, 32, 95]


# -- through the engine (scheduler and text threads, as the server runs it) --------------


@pytest.fixture
async def engine(backend: HFBackend) -> AsyncIterator[Engine]:
    engine = Engine(BatchLimits(max_rows=8))
    engine.add_backend(backend)
    engine.state = EngineState.READY
    try:
        yield engine
    finally:
        await engine.close(10)


async def test_the_engine_serves_constrained_and_free_requests_together(engine: Engine) -> None:
    results = await engine.batch(
        [
            request("Hello", TOOL_CALLS),
            request("Hello", guided=False, max_tokens=20),
            request("Hallo", PERSON, temperature=1.0, seed=5),
            request("Hello", max_tokens=3),
        ]
    )
    calls, free, person, short = results
    assert not isinstance(calls, Exception) and not isinstance(person, Exception)
    assert calls.finish_reason is FinishReason.END_OF_SEQUENCE
    assert assert_valid(calls.text, TOOL_CALLS)[0]["name"] == "get_weather"
    assert_valid(person.text, PERSON)
    assert not isinstance(free, Exception) and free.completion_tokens == 20
    assert not isinstance(short, Exception) and short.finish_reason is FinishReason.LENGTH
    with pytest.raises(InvalidRequestError, match="JSON schema"):
        await engine.complete(
            GenerationRequest(
                "x", "", "Hi", SamplingParams(max_tokens=4), constraint=JsonConstraint("[]")
            )
        )


# -- the default model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_backend() -> Iterator[HFBackend]:
    cache = Path(os.environ.get("LLM_STREAM_CACHE_DIR") or default_cache_dir())
    spec = ModelSpec("smollm2", "gguf", str(embedded_gguf_path()))
    yield load_backend(spec, "cpu", "auto", cache)


def chat(prompt: str, schema: dict[str, Any] | None, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        f"chat-{prompt[:10]}",
        "",
        prompt,
        SamplingParams(max_tokens=160, max_tokens_explicit=True, **sampling),
        apply_chat_template=True,
        constraint=constraint(schema),
    )


@pytest.mark.e2e
def test_the_default_model_answers_in_schema_valid_json(default_backend: HFBackend) -> None:
    steps = Stepper(default_backend)
    cases = [
        (chat("Describe a pet cat as JSON.", PERSON), PERSON),
        (chat("Describe a dog as JSON.", PERSON, temperature=1.0, seed=1), PERSON),
        (chat("Return a JSON object with a person's name and age.", None), None),
        (chat("Give me a JSON object about Paris.", None, temperature=0.7, seed=3), None),
        (chat("What is the weather in Tokyo for 3 days? Call the tool.", TOOL_CALLS), TOOL_CALLS),
    ]
    keys = steps.submit(*(r for r, _ in cases))
    steps.finish()
    for key, (_, schema) in zip(keys, cases, strict=True):
        assert steps.reason(key) is FinishReason.END_OF_SEQUENCE, steps.text(key)
        assert_valid(steps.text(key), schema)


def test_guided_requests_cost_one_compile_per_schema(backend: HFBackend) -> None:
    """A burst of requests with one schema (an agent's tool) shares one compiled grammar."""
    prepared = [backend.prepare(request(f"p{i}", TOOL_CALLS)) for i in range(5)]
    assert all(p.grammar is prepared[0].grammar for p in prepared)
    assert backend.prepare(request("free", guided=False)).grammar is None


async def test_concurrent_preparations_compile_safely(backend: HFBackend) -> None:
    loop = asyncio.get_running_loop()
    schemas = [PERSON, TOOL_CALLS, None, {"type": "array", "items": {"type": "integer"}}]
    prepared = await asyncio.gather(
        *(
            loop.run_in_executor(None, backend.prepare, request(f"p{i}", schemas[i % 4]))
            for i in range(16)
        )
    )
    assert all(p.grammar is not None for p in prepared)
