"""The scheduler's rules, step by step, with a fake runner instead of a model."""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import pytest

from llm_stream.engine.scheduler import BatchLimits, Scheduler, StepOutput
from llm_stream.engine.sequence import Phase
from llm_stream.engine.sequence import Sequence as Seq
from llm_stream.engine.types import (
    BatchLostError,
    FinishReason,
    GenerationRequest,
    PrefillChunk,
    PreparedRequest,
    SamplingParams,
)
from llm_stream.errors import InvalidRequestError, OverloadedError

EOS = 0


class CountingAssembler:
    """Text is each token's number; done at EOS or max_tokens."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.count = 0
        self.finish_reason: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token_id: int) -> str:
        self.count += 1
        if token_id == EOS:
            self.finish_reason = FinishReason.END_OF_SEQUENCE
        elif self.count >= self.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        return f"{token_id} "


@dataclass
class FakeRunner:
    """Keeps the decode batch's keys; every row's next token is 7, or EOS when told."""

    rows: list[int] = field(default_factory=list)
    prefills: list[list[tuple[int, int, int]]] = field(default_factory=list)
    decodes: list[list[int]] = field(default_factory=list)
    removed: list[set[int]] = field(default_factory=list)
    eos_for: set[int] = field(default_factory=set)
    fail_prefill: bool = False
    fail_decode: bool = False

    def prefill(self, chunks: Sequence[PrefillChunk]) -> list[int | None]:
        if self.fail_prefill:
            raise RuntimeError("prefill broke")
        self.prefills.append([(c.key, c.start, c.end) for c in chunks])
        out: list[int | None] = []
        for chunk in chunks:
            if chunk.completes_prompt:
                self.rows.append(chunk.key)
                out.append(self._token(chunk.key))
            else:
                out.append(None)
        return out

    def decode(self) -> list[tuple[int, int]]:
        if self.fail_decode:
            raise RuntimeError("decode broke")
        self.decodes.append(list(self.rows))
        return [(key, self._token(key)) for key in self.rows]

    def remove(self, keys: Collection[int]) -> None:
        self.removed.append(set(keys))
        self.rows = [k for k in self.rows if k not in keys]

    def reset(self) -> None:
        self.rows = []

    def _token(self, key: int) -> int:
        return EOS if key in self.eos_for else 7


def sequence(prompt_tokens: int = 4, max_tokens: int = 5, name: str = "s") -> Seq:
    request = GenerationRequest(name, "m", "p", SamplingParams(max_tokens=max_tokens))
    prepared = PreparedRequest(request, tuple(range(1, prompt_tokens + 1)), max_tokens)
    return Seq(prepared, CountingAssembler(max_tokens))


def scheduler(**limits: int) -> tuple[Scheduler, FakeRunner, list[StepOutput]]:
    runner = FakeRunner()
    delivered: list[StepOutput] = []
    return Scheduler(runner, BatchLimits(**limits), delivered.extend), runner, delivered


def events_of(delivered: list[StepOutput], seq: Seq) -> list[str]:
    return [e.text for o in delivered if o.sequence is seq for e in o.events]


def test_a_sequence_joins_at_the_next_step_and_leaves_when_it_finishes() -> None:
    sched, runner, delivered = scheduler()
    a = sequence(max_tokens=3, name="a")
    sched.submit(a)
    sched.step()  # a is prefilled (first token) and decodes once (second token)
    assert runner.prefills == [[(a.key, 0, 4)]]
    assert runner.decodes == [[a.key]]
    b = sequence(max_tokens=5, name="b")
    sched.submit(b)
    sched.step()  # b joins; a gets its third token and leaves in this same step
    assert runner.prefills[-1] == [(b.key, 0, 4)]
    assert runner.decodes[-1] == [a.key, b.key]
    assert a.finished and a.finish_reason is FinishReason.LENGTH
    assert runner.rows == [b.key]
    assert sched.running == 1
    assert events_of(delivered, a) == ["7 "] * 3
    finished = [o for o in delivered if o.finished]
    assert [o.sequence for o in finished] == [a]


def test_nobody_waits_for_another_to_finish() -> None:
    sched, runner, _ = scheduler()
    long = sequence(max_tokens=100, name="long")
    sched.submit(long)
    sched.step()
    short = sequence(max_tokens=2, name="short")
    sched.submit(short)
    sched.step()
    assert short.finished  # done while the long one goes on
    assert not long.finished and runner.rows == [long.key]


def test_end_of_sequence_at_the_first_token_leaves_before_decoding() -> None:
    sched, runner, delivered = scheduler()
    a = sequence(name="a")
    runner.eos_for.add(a.key)
    sched.submit(a)
    sched.step()
    assert a.finish_reason is FinishReason.END_OF_SEQUENCE
    assert runner.decodes == []  # never decoded: it left right after its prefill
    assert [o.finished for o in delivered] == [True]


def test_cancelled_row_is_gone_before_the_next_decode() -> None:
    sched, runner, delivered = scheduler()
    keep, victim = sequence(max_tokens=50, name="keep"), sequence(max_tokens=50, name="victim")
    sched.submit(keep, victim)
    sched.step()
    sched.cancel(victim)
    assert not victim.finished  # running rows leave at the start of the next step
    sched.step()
    assert victim.finish_reason is FinishReason.CANCELLED
    assert runner.decodes[-1] == [keep.key]
    assert victim.cancel_step is not None and victim.freed_step == victim.cancel_step + 1
    assert [o.finished for o in delivered if o.sequence is victim][-1]
    sched.step()
    assert runner.decodes[-1] == [keep.key] and not keep.finished


def test_cancel_while_waiting_leaves_the_queue_at_once() -> None:
    sched, runner, delivered = scheduler(max_rows=1)
    holder, queued = sequence(max_tokens=50), sequence(max_tokens=50)
    sched.submit(holder, queued)
    sched.step()
    assert sched.waiting == 1
    sched.cancel(queued)
    assert sched.waiting == 0
    assert queued.finish_reason is FinishReason.CANCELLED and queued.phase is Phase.FINISHED
    assert delivered[-1].sequence is queued and delivered[-1].finished
    sched.cancel(queued)  # twice is harmless
    sched.step()
    assert all(queued.key not in rows for rows in runner.decodes)


def test_row_limit_and_queue_limit() -> None:
    sched, runner, _ = scheduler(max_rows=2, max_queue=1)
    a, b, c = (sequence(max_tokens=3, name=n) for n in "abc")
    sched.submit(a, b, c)  # two free rows plus one queue place
    with pytest.raises(OverloadedError, match="busy"):
        sched.submit(sequence())
    sched.step()
    assert sched.running == 2 and sched.waiting == 1
    assert runner.decodes[-1] == [a.key, b.key]
    sched.step()  # a and b finish
    sched.step()  # c takes a freed row
    assert c.phase is Phase.DECODING


def test_submit_is_all_or_none() -> None:
    sched, _, _ = scheduler(max_rows=1, max_queue=1)
    with pytest.raises(OverloadedError):
        sched.submit(sequence(), sequence(), sequence())
    assert sched.waiting == 0


def test_token_budget_admits_what_fits_and_refuses_what_never_can() -> None:
    sched, _, _ = scheduler(max_batch_tokens=20)
    big = sequence(prompt_tokens=10, max_tokens=8, name="big")  # 18 tokens
    other = sequence(prompt_tokens=4, max_tokens=4, name="other")  # 8 tokens
    sched.submit(big, other)
    sched.step()
    assert sched.running == 1 and sched.waiting == 1  # 18 + 8 > 20: other waits
    with pytest.raises(InvalidRequestError, match="max-batch-tokens"):
        sched.submit(sequence(prompt_tokens=15, max_tokens=6))
    while not big.finished:
        sched.step()
    sched.step()
    assert other.phase is not Phase.WAITING


def test_prefill_is_bounded_while_others_decode() -> None:
    sched, runner, _ = scheduler(prefill_chunk=8)
    running = [sequence(max_tokens=100, name=f"running{i}") for i in range(4)]
    sched.submit(*running)
    while running[0].assembler.count < 8:  # established: past their first tokens
        sched.step()
    long = sequence(prompt_tokens=20, max_tokens=5, name="long")
    shorts = [sequence(prompt_tokens=5, max_tokens=5, name=f"s{i}") for i in range(3)]
    sched.submit(long, *shorts)
    for _ in range(6):
        sched.step()
    fed = runner.prefills[1:]
    # As many wait as established rows decode: at most a chunk (8 tokens) a
    # step, and every running row decodes every step.
    assert all(sum(end - start for _, start, end in step) <= 8 for step in fed)
    long_chunks = [(s, e) for step in fed for key, s, e in step if key == long.key]
    assert long_chunks == [(0, 8), (8, 16), (16, 20)]
    assert all(all(r.key in rows for r in running) for rows in runner.decodes)
    assert all(s.prefilled == s.prompt_length for s in [long, *shorts])


def test_prefill_budget_grows_with_the_sequences_waiting_per_decoding_one() -> None:
    sched, runner, _ = scheduler(prefill_chunk=8)
    first = sequence(max_tokens=100, name="first")
    sched.submit(first)
    while first.assembler.count < 8:
        sched.step()
    arrivals = [sequence(prompt_tokens=6, max_tokens=5) for _ in range(6)]
    sched.submit(*arrivals)
    sched.step()  # six wait per decoding row: 6 chunks of budget, all 36 tokens at once
    assert runner.prefills[-1] == [(s.key, 0, 6) for s in arrivals]


def test_rows_in_their_first_tokens_do_not_hold_back_their_wave() -> None:
    """A cold start whose requests arrive a few steps apart is fed at once."""
    sched, runner, _ = scheduler(prefill_chunk=8)
    early = [sequence(max_tokens=100) for _ in range(4)]
    sched.submit(*early)
    sched.step()
    late = [sequence(prompt_tokens=20, max_tokens=5) for _ in range(4)]
    sched.submit(*late)
    sched.step()  # four young rows decode, four wait: no chunking
    assert runner.prefills[-1] == [(s.key, 0, 20) for s in late]


def test_with_nobody_decoding_every_admitted_prompt_is_fed_at_once() -> None:
    sched, runner, _ = scheduler(prefill_chunk=8)
    batch = [sequence(prompt_tokens=20, max_tokens=5) for _ in range(4)]
    sched.submit(*batch)
    sched.step()
    assert runner.prefills == [[(s.key, 0, 20) for s in batch]]
    assert runner.decodes == [[s.key for s in batch]]


def test_a_failed_prefill_fails_its_sequences_only() -> None:
    sched, runner, delivered = scheduler()
    running = sequence(max_tokens=100, name="running")
    sched.submit(running)
    sched.step()
    runner.fail_prefill = True
    doomed = sequence(name="doomed")
    sched.submit(doomed)
    sched.step()
    assert doomed.finished and isinstance(doomed.error, RuntimeError)
    assert not running.finished and runner.decodes[-1] == [running.key]
    assert any(o.sequence is doomed and o.finished for o in delivered)
    runner.fail_prefill = False
    after = sequence(max_tokens=2)
    sched.submit(after)
    sched.step()
    assert after.finished and after.error is None


def test_a_failed_decode_fails_the_batch_and_the_next_one_runs() -> None:
    sched, runner, _ = scheduler()
    rows = [sequence(max_tokens=100) for _ in range(3)]
    sched.submit(*rows)
    sched.step()
    runner.fail_decode = True
    sched.step()
    assert all(s.finished and isinstance(s.error, RuntimeError) for s in rows)
    assert sched.running == 0
    runner.fail_decode = False
    after = sequence(max_tokens=3)
    sched.submit(after)
    sched.step()
    sched.step()
    assert after.finish_reason is FinishReason.LENGTH


def test_close_cancels_everything() -> None:
    sched, _, delivered = scheduler(max_rows=1)
    running, waiting = sequence(max_tokens=100), sequence(max_tokens=100)
    sched.submit(running, waiting)
    sched.step()
    sched.close()
    sched.step()
    assert running.finish_reason is FinishReason.CANCELLED
    assert waiting.finish_reason is FinishReason.CANCELLED
    assert {o.sequence.key for o in delivered if o.finished} == {running.key, waiting.key}


def test_admission_counts_the_padded_cache() -> None:
    # Rows are left-padded to the longest: two rows of a 16-token sequence cost 32.
    sched, _, _ = scheduler(max_batch_tokens=40)
    long = sequence(prompt_tokens=12, max_tokens=4, name="long")  # 16 tokens
    short = [sequence(prompt_tokens=2, max_tokens=10, name=f"s{i}") for i in range(3)]  # 12 each
    sched.submit(long, *short)
    sched.step()
    assert sched.running == 2 and sched.waiting == 2  # 3 x 16 > 40


def test_a_batch_lost_in_prefill_fails_every_row() -> None:
    sched, runner, _ = scheduler()
    running = sequence(max_tokens=100, name="running")
    sched.submit(running)
    sched.step()

    def lose(chunks: Sequence[PrefillChunk]) -> list[int | None]:
        runner.rows = []
        raise BatchLostError("join failed")

    runner.prefill = lose  # type: ignore[method-assign]
    joining = sequence(name="joining")
    sched.submit(joining)
    sched.step()
    assert all(isinstance(s.error, BatchLostError) for s in (running, joining))
    assert sched.running == 0


def test_a_text_failure_ends_only_its_own_sequence() -> None:
    sched, runner, _ = scheduler()
    good, bad = sequence(max_tokens=5, name="good"), sequence(max_tokens=5, name="bad")

    def broken(token_id: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

    bad.assembler.add = broken  # type: ignore[method-assign]
    sched.submit(good, bad)
    sched.step()
    assert bad.finished and isinstance(bad.error, UnicodeDecodeError)
    assert not good.finished and runner.rows == [good.key]


def test_the_thread_survives_a_failure_outside_the_model_steps() -> None:
    """Even a failing row removal ends only the batch: streams get an error, not a hang."""
    runner = FakeRunner()
    ended = threading.Event()
    delivered: list[StepOutput] = []

    def deliver(outputs: list[StepOutput]) -> None:
        delivered.extend(outputs)
        if any(o.finished for o in outputs):
            ended.set()

    sched = Scheduler(runner, BatchLimits(), deliver)
    real_remove, failures = runner.remove, [RuntimeError("out of memory")]

    def remove_once(keys: Collection[int]) -> None:
        if failures:
            raise failures.pop()
        real_remove(keys)

    runner.remove = remove_once  # type: ignore[method-assign]
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    try:
        first = sequence(max_tokens=1, name="first")
        other = sequence(max_tokens=100, name="other")
        sched.submit(first, other)
        assert ended.wait(10)
        # first had its whole answer; other's row was lost with the batch: an error, no hang.
        assert first.finish_reason is FinishReason.LENGTH and first.error is None
        assert other.finished and isinstance(other.error, RuntimeError)
        assert {o.sequence.key for o in delivered if o.finished} == {first.key, other.key}
        ended.clear()
        after = sequence(max_tokens=2, name="after")
        sched.submit(after)
        assert ended.wait(10)
        assert after.finish_reason is FinishReason.LENGTH and thread.is_alive()
    finally:
        sched.close()
        thread.join(10)
