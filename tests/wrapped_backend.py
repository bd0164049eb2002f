"""A real loaded model whose step runner a test can watch, slow down or break."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from llm_stream.app import load_configured_models
from llm_stream.engine.types import (
    CacheBudget,
    GenerationRequest,
    ModelBackend,
    PreparedRequest,
    StepPlan,
    StepRunner,
    StepTokens,
    TextAssembler,
)
from llm_stream.settings import Settings


class RunnerWrapper:
    """Passes every step to the real runner; subclasses add their twist."""

    def __init__(self, inner: StepRunner) -> None:
        self.inner = inner
        self.pipeline_depth = inner.pipeline_depth
        self.budget: CacheBudget = inner.budget

    def reuse_prefix(self, key: int, prepared: PreparedRequest) -> int:
        return self.inner.reuse_prefix(key, prepared)

    def launch(self, plan: StepPlan) -> None:
        self.inner.launch(plan)

    def collect(self) -> StepTokens:
        return self.inner.collect()

    def reset(self) -> None:
        self.inner.reset()


class WrappedBackend:
    """The real backend, with its runner wrapped by ``wrap``."""

    def __init__(self, inner: ModelBackend, wrap: Callable[[StepRunner], StepRunner]) -> None:
        self._inner = inner
        self._wrap = wrap
        self.model_id, self.version, self.device = inner.model_id, inner.version, inner.device
        self.execution = inner.execution
        self.sampling_defaults = inner.sampling_defaults
        self.tool_format = inner.tool_format

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        return self._inner.prepare(request)

    def text_assembler(self, prepared: PreparedRequest) -> TextAssembler:
        return self._inner.text_assembler(prepared)

    def new_runner(self) -> StepRunner:
        return self._wrap(self._inner.new_runner())


class SlowRunner(RunnerWrapper):
    """The tiny model paced like a busy GPU: every decode step takes ``delay`` seconds."""

    def __init__(self, inner: StepRunner, delay: float) -> None:
        super().__init__(inner)
        self._delay = delay

    def launch(self, plan: StepPlan) -> None:
        if plan.decode:
            time.sleep(self._delay)
        self.inner.launch(plan)


def slow_models(delay: float) -> Callable[[Settings], Sequence[ModelBackend]]:
    """A model loader whose models take ``delay`` seconds a decode step."""

    def load(settings: Settings) -> Sequence[ModelBackend]:
        return [
            WrappedBackend(b, lambda runner: SlowRunner(runner, delay))
            for b in load_configured_models(settings)
        ]

    return load
