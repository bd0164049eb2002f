"""The output stage: token ids in, text events out, stop sequences freeing rows."""

from __future__ import annotations

from llm_stream.engine.output import OutputStage, PublishedStep, StreamState
from llm_stream.engine.scheduler import StepOutput
from llm_stream.engine.sequence import Sequence
from llm_stream.engine.types import (
    FinishReason,
    GenerationRequest,
    PreparedRequest,
    SamplingParams,
    StreamEnd,
    TokenEvent,
)
from llm_stream.model.text_assembler import TextAssembler

EOS = 0
LETTERS = {i: chr(ord("a") + i - 1) for i in range(1, 27)}


class Letters:
    """A decoder whose ids 1-26 are the letters a-z."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(LETTERS.get(i, "") for i in token_ids)


def stream(max_tokens: int = 10, stop: tuple[str, ...] = ()) -> StreamState:
    sampling = SamplingParams(max_tokens=max_tokens, stop=stop)
    prepared = PreparedRequest(GenerationRequest("r", "m", "p", sampling), (1, 2), max_tokens)
    assembler = TextAssembler(Letters(), prepared.prompt_ids, frozenset({EOS}), max_tokens, stop)
    return StreamState(Sequence(prepared), assembler)


def stage() -> tuple[OutputStage, list[Sequence]]:
    released: list[Sequence] = []
    published: list[PublishedStep] = []
    return OutputStage("m", published.append, released.append, lambda: (1, 0, 1)), released


def texts(step: PublishedStep, key: int) -> list[str]:
    return [
        e.text for k, events in step.events if k == key for e in events if isinstance(e, TokenEvent)
    ]


def ends(step: PublishedStep, key: int) -> list[StreamEnd]:
    return [e for k, events in step.events if k == key for e in events if isinstance(e, StreamEnd)]


def test_token_ids_become_text_and_the_scheduler_ends_the_stream() -> None:
    output, released = stage()
    state = stream(max_tokens=3)
    key = state.sequence.key
    output.register(state)
    first = output.process([StepOutput(key, [8, 9], first_token_s=0.1, inter_token_s=[0.02])])
    assert texts(first, key) == ["h", "i"] and first.first_token_s == [0.1]
    last = output.process([StepOutput(key, [1], finished=True, finish_reason=FinishReason.LENGTH)])
    assert texts(last, key) == ["a"]
    assert ends(last, key) == [StreamEnd(FinishReason.LENGTH, 2, 3)]
    assert [r.finish_reason for r in last.finished] == [FinishReason.LENGTH]
    assert not released
    assert output.process([StepOutput(key, [5])]).events == []  # forgotten once finished


def test_a_stop_sequence_ends_the_stream_and_frees_its_row() -> None:
    output, released = stage()
    state = stream(stop=("cd",))
    key = state.sequence.key
    output.register(state)
    step = output.process([StepOutput(key, [1, 2, 3, 4, 5])])
    assert "".join(texts(step, key)) == "ab"
    assert ends(step, key) == [StreamEnd(FinishReason.STOP_SEQUENCE, 2, 4)]
    assert released == [state.sequence]
    # The row computed on until the scheduler freed it: none of that reaches the stream.
    later = output.process([StepOutput(key, [6, 7], finished=True)])
    assert later.events == [] and later.finished == []
    assert [r.finish_reason for r in step.finished] == [FinishReason.STOP_SEQUENCE]


def test_a_text_failure_ends_only_its_own_stream() -> None:
    output, released = stage()
    good, bad = stream(), stream()
    output.register(good)
    output.register(bad)

    def broken(token_id: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

    bad.assembler.add = broken  # type: ignore[method-assign]
    step = output.process([StepOutput(good.sequence.key, [1]), StepOutput(bad.sequence.key, [1])])
    assert texts(step, good.sequence.key) == ["a"]
    (failure,) = [e for k, events in step.events if k == bad.sequence.key for e in events]
    assert isinstance(failure, UnicodeDecodeError)
    assert released == [bad.sequence]
    assert step.finished[0].error is not None and step.finished[0].finish_reason is None


def test_a_cancelled_stream_ends_cancelled_with_its_steps_after_cancel() -> None:
    output, _ = stage()
    state = stream()
    key = state.sequence.key
    output.register(state)
    output.process([StepOutput(key, [1])])
    step = output.process(
        [StepOutput(key, finished=True, finish_reason=FinishReason.CANCELLED, steps_after_cancel=1)]
    )
    assert ends(step, key) == [StreamEnd(FinishReason.CANCELLED, 2, 1)]
    assert step.finished[0].steps_after_cancel == 1
