"""One model's engine core: its scheduler, its output stage and their threads.

The :class:`~llm_stream.engine.engine.Engine` (on the event loop) talks to a core
in values only: it admits ``(key, request)`` pairs, cancels keys, and receives
each step's events as a :class:`~llm_stream.engine.output.PublishedStep` through
the ``publish`` callback, on whichever thread produced them. So the same core
runs in the server's process (:class:`LocalCore`, here) or in a process of its
own with its own interpreter lock (:mod:`llm_stream.engine.process`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from llm_stream.engine.output import OutputStage, PublishedStep, StreamState
from llm_stream.engine.scheduler import BatchLimits, Scheduler, StepOutput
from llm_stream.engine.sequence import Sequence as Seq
from llm_stream.engine.types import GenerationRequest, ModelBackend, ModelInfo

log = logging.getLogger(__name__)

Publish = Callable[[PublishedStep], None]
# Per admitted item: None once it is queued, or its own error (it was not queued).
Admitted = list[Exception | None]


class ModelCore(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    @property
    def running(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def steps(self) -> int: ...

    async def admit(self, items: Sequence[tuple[int, GenerationRequest]]) -> Admitted:
        """Prepare the items and queue those that can run, all together.

        An item that cannot be served at all (bad request, too long) gets its own
        error; when the batch cannot take every other item now, none is queued and
        the call raises (OverloadedError, UnavailableError).
        """
        ...

    def cancel(self, key: int) -> None: ...

    def cancel_all(self) -> None: ...

    async def close(self, timeout_s: float) -> None:
        """Cancel everything and wait for the core's threads (or process) to end."""
        ...


@runtime_checkable
class CoreStarter(Protocol):
    """A model whose core runs elsewhere (an engine process), started for an engine."""

    @property
    def model_id(self) -> str: ...

    def start_core(self, publish: Publish, on_lost: Callable[[str], None]) -> ModelCore:
        """Attach ``publish``; ``on_lost`` (any thread) is told if the core dies."""
        ...


class LocalCore:
    """The core in this process: a scheduler thread and a text thread."""

    def __init__(self, backend: ModelBackend, limits: BatchLimits, publish: Publish) -> None:
        self.info: ModelInfo = backend
        self._backend = backend
        runner = backend.new_runner()
        # A device computes: text on its own thread, so the step thread only drives
        # the device; on the CPU, the step thread makes it between forwards.
        text_thread = runner.pipeline_depth > 0
        self._sequences: dict[int, Seq] = {}
        self._lock = threading.Lock()

        def deliver(outputs: list[StepOutput]) -> None:
            if text_thread:
                self._output.put(outputs)
            else:
                self._output.publish_now(outputs)

        def forget_and_publish(step: PublishedStep) -> None:
            with self._lock:
                for key in step.forgotten:
                    self._sequences.pop(key, None)
            publish(step)

        self._scheduler = Scheduler(runner, limits, deliver)
        self._output = OutputStage(
            backend.model_id,
            forget_and_publish,
            self._scheduler.release,
            lambda: (self._scheduler.running, self._scheduler.waiting, self._scheduler.steps),
        )
        # Preparation tokenizes: never on the event loop.
        self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="llm-stream-prepare")
        self._threads = (
            threading.Thread(
                target=self._scheduler.run, name=f"llm-stream-batch-{backend.model_id}", daemon=True
            ),
            threading.Thread(
                target=self._output.run, name=f"llm-stream-text-{backend.model_id}", daemon=True
            ),
        )
        for thread in self._threads:
            thread.start()

    @property
    def running(self) -> int:
        return self._scheduler.running

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting

    @property
    def steps(self) -> int:
        return self._scheduler.steps

    async def admit(self, items: Sequence[tuple[int, GenerationRequest]]) -> Admitted:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_pool, self.admit_now, items)

    def admit_now(self, items: Sequence[tuple[int, GenerationRequest]]) -> Admitted:
        """:meth:`admit`, blocking: preparation tokenizes (call it off the event loop)."""
        results: Admitted = []
        states: list[StreamState] = []
        for key, request in items:
            try:
                prepared = self._backend.prepare(request)
                sequence = Seq(prepared, key=key)
                self._scheduler.check_budget(sequence)
                states.append(StreamState(sequence, self._backend.text_assembler(prepared)))
                results.append(None)
            except Exception as exc:  # this item's own error; the others may still run
                results.append(exc)
        sequences = [state.sequence for state in states]
        with self._lock:
            for state in states:
                self._output.register(state)
                self._sequences[state.sequence.key] = state.sequence
        try:
            self._scheduler.submit(*sequences)
        except BaseException:
            with self._lock:
                for sequence in sequences:
                    self._output.forget(sequence.key)
                    self._sequences.pop(sequence.key, None)
            raise
        return results

    def cancel(self, key: int) -> None:
        with self._lock:
            sequence = self._sequences.get(key)
        if sequence is not None:
            self._scheduler.cancel(sequence)

    def cancel_all(self) -> None:
        self._scheduler.cancel_all()

    def close_now(self, timeout_s: float) -> None:
        """Cancel everything; wait for the threads (a thread left inside a torch call
        when the interpreter exits aborts the process)."""
        self._scheduler.close()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        batch, text = self._threads
        batch.join(timeout_s)
        if batch.is_alive():
            log.warning("the batch of %s did not stop within %.0f s", self.info.model_id, timeout_s)
        self._output.close()
        text.join(timeout_s)

    async def close(self, timeout_s: float) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_now, timeout_s)
