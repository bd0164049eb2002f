"""The scheduler's rules, step by step, with a fake runner instead of a model."""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from llm_stream.engine.scheduler import BatchLimits, Scheduler, StepOutput
from llm_stream.engine.sequence import Phase
from llm_stream.engine.sequence import Sequence as Seq
from llm_stream.engine.types import (
    BatchLostError,
    FinishReason,
    GenerationRequest,
    PreparedRequest,
    SamplingParams,
    StepPlan,
    StepTokens,
)
from llm_stream.errors import InvalidRequestError, OverloadedError

EOS = 0


@dataclass(frozen=True)
class FakeBudget:
    """The CPU rule: rows x the widest prompt + max_tokens, at most ``total``."""

    total: int = 65536

    @property
    def max_sequence_tokens(self) -> int:
        return self.total

    @property
    def limit_hint(self) -> str:
        return f"--max-batch-tokens {self.total}"

    def admits(self, costs: Sequence[int], candidate: int) -> bool:
        return (len(costs) + 1) * max([*costs, candidate]) <= self.total


@dataclass
class FakeRunner:
    """Carries plans out at once; every row's next token is 7, or EOS when told.

    With ``pipeline_depth`` 1 the scheduler keeps one step in flight, as on a GPU.
    """

    pipeline_depth: int = 0
    budget: FakeBudget = field(default_factory=FakeBudget)
    rows: list[int] = field(default_factory=list)
    plans: list[StepPlan] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    eos_for: set[int] = field(default_factory=set)
    fail_prefill: bool = False
    fail_launch: BaseException | None = None
    fail_collect: list[BaseException] = field(default_factory=list)
    pending: collections.deque[StepTokens] = field(default_factory=collections.deque)
    # Prompt tokens its prefix cache holds for every admitted sequence.
    cached_prefix: int = 0
    reused: list[int] = field(default_factory=list)

    def reuse_prefix(self, key: int, prepared: PreparedRequest) -> int:
        self.reused.append(key)
        return self.cached_prefix

    def launch(self, plan: StepPlan) -> None:
        if self.fail_launch is not None:
            raise self.fail_launch
        self.calls.append(f"launch {plan.step}")
        self.plans.append(plan)
        self.rows = [key for key in self.rows if key not in plan.remove]
        tokens = [(key, self._token(key)) for key in self.rows] if plan.decode else []
        failed: list[tuple[int, BaseException]] = []
        for chunk in plan.prefill:
            if self.fail_prefill:
                failed.append((chunk.key, RuntimeError("prefill broke")))
            elif chunk.completes_prompt:
                self.rows.append(chunk.key)
                tokens.append((chunk.key, self._token(chunk.key)))
        self.pending.append(StepTokens(plan.step, tuple(tokens), tuple(failed)))

    def collect(self) -> StepTokens:
        result = self.pending.popleft()
        self.calls.append(f"collect {result.step}")
        if self.fail_collect:
            raise self.fail_collect.pop()
        return result

    def reset(self) -> None:
        self.rows = []
        self.pending.clear()

    def _token(self, key: int) -> int:
        return EOS if key in self.eos_for else 7

    @property
    def decodes(self) -> list[list[int]]:
        """The rows of each decode, as they were when it ran."""
        rows: list[int] = []
        out = []
        for plan in self.plans:
            rows = [key for key in rows if key not in plan.remove]
            if plan.decode:
                out.append(list(rows))
            rows += [c.key for c in plan.prefill if c.completes_prompt]
        return out

    @property
    def prefills(self) -> list[list[tuple[int, int, int]]]:
        return [[(c.key, c.start, c.end) for c in p.prefill] for p in self.plans if p.prefill]

    @property
    def removed(self) -> list[set[int]]:
        return [set(p.remove) for p in self.plans if p.remove]


def sequence(prompt_tokens: int = 4, max_tokens: int = 5, name: str = "s") -> Seq:
    request = GenerationRequest(name, "m", "p", SamplingParams(max_tokens=max_tokens))
    prepared = PreparedRequest(
        request, tuple(range(1, prompt_tokens + 1)), max_tokens, stop_token_ids=frozenset({EOS})
    )
    return Seq(prepared)


def scheduler(
    runner: FakeRunner | None = None, **limits: int
) -> tuple[Scheduler, FakeRunner, list[StepOutput]]:
    runner = runner or FakeRunner()
    delivered: list[StepOutput] = []
    return Scheduler(runner, BatchLimits(**limits), delivered.extend), runner, delivered


def tokens_of(delivered: list[StepOutput], seq: Seq) -> list[int]:
    return [t for o in delivered if o.key == seq.key for t in o.token_ids]


def finished_keys(delivered: list[StepOutput]) -> list[int]:
    return [o.key for o in delivered if o.finished]


def test_a_sequence_joins_with_its_first_token_and_leaves_when_it_finishes() -> None:
    sched, runner, delivered = scheduler()
    a = sequence(max_tokens=3, name="a")
    sched.submit(a)
    sched.step()  # a is prefilled: its first token
    assert runner.prefills == [[(a.key, 0, 4)]]
    assert runner.decodes == []
    b = sequence(max_tokens=5, name="b")
    sched.submit(b)
    sched.step()  # a decodes its second token; b is prefilled
    assert runner.prefills[-1] == [(b.key, 0, 4)]
    assert runner.decodes[-1] == [a.key]
    sched.step()  # a's third and last token
    assert a.finished and a.finish_reason is FinishReason.LENGTH
    assert runner.decodes[-1] == [a.key, b.key]
    sched.step()  # its row is freed before anything else runs
    assert runner.removed[-1] == {a.key}
    assert runner.rows == [b.key] and sched.running == 1
    assert tokens_of(delivered, a) == [7, 7, 7]
    assert finished_keys(delivered) == [a.key]


def test_nobody_waits_for_another_to_finish() -> None:
    sched, runner, _ = scheduler()
    long = sequence(max_tokens=100, name="long")
    sched.submit(long)
    sched.step()
    short = sequence(max_tokens=2, name="short")
    sched.submit(short)
    sched.step()
    sched.step()
    assert short.finished  # done while the long one goes on
    sched.step()
    assert not long.finished and runner.rows == [long.key]


def test_end_of_sequence_at_the_first_token_leaves_before_decoding() -> None:
    sched, runner, delivered = scheduler()
    a = sequence(name="a")
    runner.eos_for.add(a.key)
    sched.submit(a)
    sched.step()
    assert a.finish_reason is FinishReason.END_OF_SEQUENCE
    sched.step()
    assert runner.decodes == []  # never decoded: it left right after its prefill
    assert runner.removed == [{a.key}]
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
    assert runner.removed[-1] == {victim.key}
    assert runner.decodes[-1] == [keep.key]
    assert victim.cancel_step is not None and victim.freed_step == victim.cancel_step + 1
    final = [o for o in delivered if o.key == victim.key][-1]
    assert final.finished and final.steps_after_cancel == 1
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
    assert delivered[-1].key == queued.key and delivered[-1].finished
    sched.cancel(queued)  # twice is harmless
    sched.step()
    assert all(queued.key not in rows for rows in runner.decodes)


def test_row_limit_and_queue_limit() -> None:
    sched, runner, _ = scheduler(max_rows=2, max_queue=1)
    a, b, c = (sequence(max_tokens=2, name=n) for n in "abc")
    sched.submit(a, b, c)  # two free rows plus one queue place
    with pytest.raises(OverloadedError, match="busy"):
        sched.submit(sequence())
    sched.step()
    assert sched.running == 2 and sched.waiting == 1
    sched.step()  # a and b get their last tokens
    assert runner.decodes[-1] == [a.key, b.key]
    sched.step()  # their rows are freed and c takes one
    assert c.phase is Phase.DECODING


def test_submit_is_all_or_none() -> None:
    sched, _, _ = scheduler(max_rows=1, max_queue=1)
    with pytest.raises(OverloadedError):
        sched.submit(sequence(), sequence(), sequence())
    assert sched.waiting == 0


def test_the_budget_admits_what_fits_and_refuses_what_never_can() -> None:
    sched, _, _ = scheduler(FakeRunner(budget=FakeBudget(20)))
    big = sequence(prompt_tokens=10, max_tokens=8, name="big")  # 18 tokens
    other = sequence(prompt_tokens=4, max_tokens=4, name="other")  # 8 tokens
    sched.submit(big, other)
    sched.step()
    assert sched.running == 1 and sched.waiting == 1  # 2 x 18 > 20: other waits
    with pytest.raises(InvalidRequestError, match="max-batch-tokens 20"):
        sched.submit(sequence(prompt_tokens=15, max_tokens=6))
    while not big.finished:
        sched.step()
    sched.step()
    assert other.phase is not Phase.WAITING


def test_prefill_is_bounded_while_others_decode() -> None:
    sched, runner, _ = scheduler(prefill_chunk=8)
    running = [sequence(max_tokens=100, name=f"running{i}") for i in range(4)]
    sched.submit(*running)
    while running[0].generated < 10:  # established: past their first tokens
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
    assert all(all(r.key in rows for r in running) for rows in runner.decodes[1:])
    assert all(s.prefilled == s.prompt_length for s in [long, *shorts])


def test_prefill_budget_grows_with_the_sequences_waiting_per_decoding_one() -> None:
    sched, runner, _ = scheduler(prefill_chunk=8)
    first = sequence(max_tokens=100, name="first")
    sched.submit(first)
    while first.generated < 10:
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
    sched.step()
    assert runner.decodes == [[s.key for s in batch]]


def test_one_step_never_feeds_more_than_the_prefill_cap() -> None:
    sched, runner, _ = scheduler(prefill_chunk=8, max_prefill_tokens=50)
    batch = [sequence(prompt_tokens=20, max_tokens=5) for _ in range(4)]
    sched.submit(*batch)
    sched.step()
    # Two whole prompts and the first 10 tokens of a third: 50 tokens.
    keys = [s.key for s in batch]
    assert runner.prefills[0] == [(keys[0], 0, 20), (keys[1], 0, 20), (keys[2], 0, 10)]


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
    assert any(o.key == doomed.key and o.finished and o.error for o in delivered)
    runner.fail_prefill = False
    after = sequence(max_tokens=2)
    sched.submit(after)
    sched.step()
    sched.step()
    assert after.finished and after.error is None


def test_a_failed_step_fails_the_batch_and_the_next_one_runs() -> None:
    sched, runner, _ = scheduler()
    rows = [sequence(max_tokens=100) for _ in range(3)]
    sched.submit(*rows)
    sched.step()
    runner.fail_launch = RuntimeError("decode broke")
    sched.step()
    assert all(s.finished and isinstance(s.error, RuntimeError) for s in rows)
    assert sched.running == 0
    runner.fail_launch = None
    after = sequence(max_tokens=3)
    sched.submit(after)
    for _ in range(3):
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
    assert set(finished_keys(delivered)) == {running.key, waiting.key}


def test_admission_asks_the_runners_budget() -> None:
    # The CPU budget counts padded rows: two rows of a 16-token sequence cost 32.
    sched, _, _ = scheduler(FakeRunner(budget=FakeBudget(40)))
    long = sequence(prompt_tokens=12, max_tokens=4, name="long")  # 16 tokens
    short = [sequence(prompt_tokens=2, max_tokens=10, name=f"s{i}") for i in range(3)]  # 12 each
    sched.submit(long, *short)
    sched.step()
    assert sched.running == 2 and sched.waiting == 2  # 3 x 16 > 40


def test_a_batch_lost_in_a_step_fails_every_row() -> None:
    sched, runner, _ = scheduler()
    running = sequence(max_tokens=100, name="running")
    sched.submit(running)
    sched.step()
    runner.fail_launch = BatchLostError("join failed")
    joining = sequence(name="joining")
    sched.submit(joining)
    sched.step()
    assert all(isinstance(s.error, BatchLostError) for s in (running, joining))
    assert sched.running == 0


def test_a_released_row_leaves_at_the_next_step() -> None:
    """The text side saw a stop sequence: the row is freed, the sequence ends."""
    sched, runner, delivered = scheduler()
    a, b = sequence(max_tokens=50, name="a"), sequence(max_tokens=50, name="b")
    sched.submit(a, b)
    sched.step()
    sched.release(a)
    sched.step()
    assert runner.removed[-1] == {a.key} and runner.decodes[-1] == [b.key]
    assert a.finished and a.error is None
    assert [o for o in delivered if o.key == a.key][-1].finished


# -- one step in flight (a GPU runner) ---------------------------------------------------


def test_the_next_step_is_launched_before_the_last_is_collected() -> None:
    sched, runner, delivered = scheduler(FakeRunner(pipeline_depth=1))
    a = sequence(max_tokens=4, name="a")
    sched.submit(a)
    for _ in range(3):
        sched.step()
    assert runner.calls == ["launch 1", "launch 2", "collect 1", "launch 3", "collect 2"]
    assert tokens_of(delivered, a) == [7, 7]


def test_rows_whose_every_token_is_planned_leave_before_the_last_one_arrives() -> None:
    sched, runner, delivered = scheduler(FakeRunner(pipeline_depth=1))
    a = sequence(max_tokens=3, name="a")
    sched.submit(a)
    for _ in range(5):
        sched.step()
    # Tokens 1 (prefill), 2 and 3 (decodes): its row leaves at step 4, with token 3
    # still in flight, and no step computes a fourth.
    assert runner.decodes == [[a.key], [a.key]]
    assert runner.removed == [{a.key}]
    assert tokens_of(delivered, a) == [7, 7, 7]
    assert a.finish_reason is FinishReason.LENGTH and finished_keys(delivered) == [a.key]


def test_a_token_computed_after_the_end_of_sequence_is_dropped() -> None:
    runner = FakeRunner(pipeline_depth=1)
    sched, _, delivered = scheduler(runner)
    a = sequence(max_tokens=50, name="a")
    sched.submit(a)
    sched.step()
    sched.step()  # token 2 launched
    runner.eos_for.add(a.key)  # token 3 (launched next) is the end of sequence
    sched.step()
    sched.step()  # token 4 is launched before token 3 is seen
    sched.step()
    sched.step()
    assert tokens_of(delivered, a) == [7, 7, EOS]
    assert a.finish_reason is FinishReason.END_OF_SEQUENCE
    assert len(runner.decodes) == 3 and runner.removed == [{a.key}]


def test_an_idle_scheduler_collects_every_step_in_flight() -> None:
    sched, runner, delivered = scheduler(FakeRunner(pipeline_depth=1))
    a = sequence(max_tokens=1, name="a")
    sched.submit(a)
    sched.step()  # prefill, in flight
    sched.step()  # nothing more to compute: the row is freed and the step collected
    assert runner.calls == ["launch 1", "launch 2", "collect 1", "collect 2"]
    assert a.finished and tokens_of(delivered, a) == [7]


def test_the_thread_survives_a_failure_outside_the_model_steps() -> None:
    """Even a step whose tokens cannot be fetched ends only the batch: errors, no hang."""
    runner = FakeRunner()
    ended = threading.Event()
    delivered: list[StepOutput] = []

    def deliver(outputs: list[StepOutput]) -> None:
        delivered.extend(outputs)
        if any(o.finished for o in outputs):
            ended.set()

    sched = Scheduler(runner, BatchLimits(), deliver)
    thread = threading.Thread(target=sched.run, daemon=True)
    thread.start()
    try:
        first = sequence(max_tokens=1, name="first")
        sched.submit(first)
        assert ended.wait(10)
        assert first.finish_reason is FinishReason.LENGTH and first.error is None
        ended.clear()
        runner.fail_collect.append(RuntimeError("device lost"))
        other = sequence(max_tokens=100, name="other")
        sched.submit(other)
        assert ended.wait(10)
        assert other.finished and isinstance(other.error, RuntimeError)
        ended.clear()
        after = sequence(max_tokens=2, name="after")
        sched.submit(after)
        assert ended.wait(10)
        assert after.finish_reason is FinishReason.LENGTH and thread.is_alive()
    finally:
        sched.close()
        thread.join(10)


def test_plans_say_how_many_established_streams_decode() -> None:
    """The runner feeds prompts differently when steady streams would be held back."""
    sched, runner, _ = scheduler()
    early = [sequence(max_tokens=100) for _ in range(3)]
    sched.submit(*early)
    for _ in range(12):
        sched.step()
    late = sequence(max_tokens=100)
    sched.submit(late)
    sched.step()
    assert [p.established for p in runner.plans[:8]] == [0] * 8  # tokens 1 to 8
    assert runner.plans[-1].established == 3


# -- prefix cache ------------------------------------------------------------------


def test_a_cached_prefix_starts_the_prefill_after_it() -> None:
    sched, runner, delivered = scheduler(runner=FakeRunner(cached_prefix=16))
    a = sequence(prompt_tokens=20, max_tokens=3, name="a")
    sched.submit(a)
    sched.step()
    assert runner.reused == [a.key]
    assert runner.prefills == [[(a.key, 16, 20)]]
    assert a.cached_tokens == 16
    sched.step()
    sched.step()
    assert tokens_of(delivered, a) == [7, 7, 7]


def test_a_prompt_held_whole_still_computes_its_last_token() -> None:
    sched, runner, _ = scheduler(runner=FakeRunner(cached_prefix=50))
    a = sequence(prompt_tokens=20, name="a")
    sched.submit(a)
    sched.step()
    # Its last token's logits give the first token: at least one is fed.
    assert runner.prefills == [[(a.key, 19, 20)]]
    assert a.cached_tokens == 19


def test_what_is_left_after_a_cached_prefix_is_fed_in_chunks() -> None:
    sched, runner, _ = scheduler(runner=FakeRunner(cached_prefix=16), prefill_chunk=8)
    early = sequence(max_tokens=100, name="early")
    sched.submit(early)
    sched.step()
    for _ in range(10):  # early is established: later prompts go a chunk a step
        sched.step()
    late = sequence(prompt_tokens=40, max_tokens=3, name="late")
    sched.submit(late)
    for _ in range(4):
        sched.step()
    fed = [chunk for step in runner.prefills for chunk in step if chunk[0] == late.key]
    assert fed == [(late.key, 16, 24), (late.key, 24, 32), (late.key, 32, 40)]


def test_without_a_prefix_cache_every_prompt_is_fed_from_its_start() -> None:
    sched, runner, _ = scheduler()
    a = sequence(prompt_tokens=20, name="a")
    sched.submit(a)
    sched.step()
    assert runner.prefills == [[(a.key, 0, 20)]] and a.cached_tokens == 0
