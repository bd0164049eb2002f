"""A model's engine core in a process of its own (vLLM v1's EngineCore).

At a GPU's token rate the server's host work no longer fits one interpreter
lock: the event loop spends some 40 us of it per streamed token in gRPC, and the
scheduler, the step launches and detokenisation need it too (measured with
``scripts/host_ceiling.py`` and py-spy; the README has the figures). So on a GPU
the core (:class:`~llm_stream.engine.core.LocalCore`: preparation, scheduler,
runner, text) runs in a child process, and the server's process keeps the event
loop, gRPC and HTTP. They exchange values over a pipe: requests to admit and
cancels one way, one :class:`~llm_stream.engine.output.PublishedStep` per step the
other. The child loads the model itself; if it dies, every stream it held ends
with UNAVAILABLE and the server reports it (health NOT_SERVING, exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from llm_stream.engine.core import Admitted, LocalCore, Publish
from llm_stream.engine.output import PublishedStep
from llm_stream.engine.scheduler import BatchLimits
from llm_stream.engine.types import GenerationRequest
from llm_stream.errors import ModelLoadError, UnavailableError

log = logging.getLogger(__name__)

# How long the child gets to stop its batch before it is terminated.
_CLOSE_GRACE_S = 30.0


def load_model(spec: CoreSpec) -> Any:
    """The child's loader: the model of ``spec`` with its runner (graphs captured)."""
    from llm_stream.model.loader import load_backend

    return load_backend(spec.model, spec.device, spec.dtype, spec.cache_dir, spec.options)


@dataclass(frozen=True)
class CoreSpec:
    """Everything the child needs to load a model and run its core (picklable)."""

    model: Any  # llm_stream.model.sources.ModelSpec (the child imports torch, not us)
    device: str
    dtype: str
    cache_dir: Path
    options: Any  # llm_stream.model.execution.ExecutionOptions
    limits: BatchLimits
    log_level: str
    # A module-level function (so that it pickles) returning a ModelBackend.
    loader: Callable[[CoreSpec], Any] = load_model


@dataclass(frozen=True)
class ProcessInfo:
    model_id: str
    version: str
    device: str
    execution: str
    sampling_defaults: Mapping[str, float]
    tool_format: str | None = None


# -- the server's side ----------------------------------------------------------------


def start_engine_process(spec: CoreSpec) -> EngineProcess:
    """Start a child, let it load the model; returns once it serves (blocking).

    Raises ModelLoadError with the child's reason when it cannot load the model.
    """
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    name = f"llm-stream-engine-{getattr(spec.model, 'model_id', 'model')}"
    process = context.Process(target=_child_main, args=(theirs, spec), name=name, daemon=True)
    process.start()
    theirs.close()
    while not ours.poll(0.5):
        if not process.is_alive():
            raise ModelLoadError(
                f"the engine process {name} exited while loading (exit code {process.exitcode}); "
                "its log lines above say why"
            )
    try:
        kind, payload = ours.recv()
    except EOFError as exc:
        raise ModelLoadError(f"the engine process {name} closed while loading") from exc
    if kind == "failed":
        process.join(10)
        raise payload if isinstance(payload, ModelLoadError) else ModelLoadError(str(payload))
    assert kind == "ready"
    info = replace(payload, execution=f"{payload.execution}, engine process (pid {process.pid})")
    return EngineProcess(process, ours, info)


class EngineProcess:
    """A child that has loaded its model; its core starts talking once an engine attaches."""

    def __init__(self, process: Any, conn: Connection, info: ProcessInfo) -> None:
        self.process = process
        self.info = info
        self.model_id, self.version = info.model_id, info.version
        self.device, self.execution = info.device, info.execution
        self.sampling_defaults = info.sampling_defaults
        self.tool_format = info.tool_format
        self._conn = conn

    def start_core(self, publish: Publish, on_lost: Callable[[str], None]) -> RemoteCore:
        return RemoteCore(self, self._conn, publish, on_lost)


@dataclass
class _Counters:
    running: int = 0
    waiting: int = 0
    steps: int = 0


class RemoteCore:
    """The engine's handle on a core in a child process (same interface as LocalCore)."""

    def __init__(
        self,
        owner: EngineProcess,
        conn: Connection,
        publish: Publish,
        on_lost: Callable[[str], None],
    ) -> None:
        self.info = owner.info
        self._process = owner.process
        self._conn = conn
        self._publish = publish
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._send_lock = threading.Lock()
        self._counters = _Counters()
        self._pending: dict[int, asyncio.Future[Admitted]] = {}
        self._ids = itertools.count(1)
        # Keys admitted and not yet forgotten by the core: what a lost child leaves hanging.
        self._live: set[int] = set()
        self._live_lock = threading.Lock()
        self._closing = False
        self._closed = threading.Event()
        self._reader = threading.Thread(
            target=self._read, name=f"llm-stream-engine-reader-{self.info.model_id}", daemon=True
        )
        self._reader.start()

    @property
    def running(self) -> int:
        return self._counters.running

    @property
    def waiting(self) -> int:
        return self._counters.waiting

    @property
    def steps(self) -> int:
        return self._counters.steps

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    async def admit(self, items: Sequence[tuple[int, GenerationRequest]]) -> Admitted:
        if self._closed.is_set():
            raise UnavailableError(f"the engine process of {self.info.model_id} is gone; retry")
        request_id = next(self._ids)
        answer: asyncio.Future[Admitted] = self._loop.create_future()
        self._pending[request_id] = answer
        with self._live_lock:
            self._live.update(key for key, _ in items)
        try:
            self._send(("admit", request_id, list(items)))
            results = await answer
        except BaseException:
            with self._live_lock:
                self._live.difference_update(key for key, _ in items)
            raise
        finally:
            self._pending.pop(request_id, None)
        with self._live_lock:
            self._live.difference_update(
                key for (key, _), error in zip(items, results, strict=True) if error is not None
            )
        return results

    def cancel(self, key: int) -> None:
        self._send_quietly(("cancel", key))

    def cancel_all(self) -> None:
        self._send_quietly(("cancel_all",))

    def _send_quietly(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):  # gone: its streams end through _lost
            self._send(message)

    async def close(self, timeout_s: float) -> None:
        self._closing = True
        self._send_quietly(("close", timeout_s))
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._closed.wait, timeout_s + _CLOSE_GRACE_S):
            log.warning("the engine process of %s did not stop; terminating it", self.info.model_id)
        await loop.run_in_executor(None, self._stop_process)

    def _stop_process(self) -> None:
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

    # -- the reader thread ----------------------------------------------------------

    def _read(self) -> None:
        reason = "closed"
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "step":
                    self._on_step(message[1])
                elif kind == "admitted":
                    _, request_id, results, error = message
                    self._loop.call_soon_threadsafe(self._answer, request_id, results, error)
                elif kind == "closed":
                    break
        except (EOFError, OSError) as exc:
            reason = f"the engine process of {self.info.model_id} exited unexpectedly ({exc!r})"
        finally:
            self._closed.set()
            if reason != "closed" and not self._closing:
                self._lost(reason)

    def _on_step(self, step: PublishedStep) -> None:
        self._counters = _Counters(step.batch_rows, step.waiting, step.steps)
        if step.forgotten:
            with self._live_lock:
                self._live.difference_update(step.forgotten)
        self._publish(step)

    def _answer(
        self, request_id: int, results: Admitted | None, error: BaseException | None
    ) -> None:
        answer = self._pending.get(request_id)
        if answer is None or answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            assert results is not None
            answer.set_result(results)

    def _lost(self, reason: str) -> None:
        """The child died: every stream it held ends retryably, and the server is told."""
        self._process.join(1)
        detail = f"{reason}, exit code {self._process.exitcode}"
        log.critical("%s", detail)
        with self._live_lock:
            keys, self._live = sorted(self._live), set()
        error = UnavailableError(
            f"the model {self.info.model_id!r} stopped on this replica; retry on another"
        )
        self._counters = _Counters()
        self._publish(PublishedStep(self.info.model_id, 0, events=[(key, [error]) for key in keys]))

        def fail_pending() -> None:
            for answer in self._pending.values():
                if not answer.done():
                    answer.set_exception(error)

        self._loop.call_soon_threadsafe(fail_pending)
        self._on_lost(detail)


# -- the child's side -----------------------------------------------------------------


def _child_main(conn: Connection, spec: CoreSpec) -> None:
    # Ctrl-C reaches the whole process group: the server drains, then closes this core.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from llm_stream.runtime import tune_openmp

    tune_openmp()  # before torch is imported
    from llm_stream.logging_setup import configure_logging

    configure_logging(spec.log_level)
    try:
        backend = spec.loader(spec)
    except Exception as exc:
        log.exception("cannot load model %s", getattr(spec.model, "model_id", "?"))
        conn.send(("failed", ModelLoadError(str(exc))))
        return
    ChildCore(conn, backend, spec.limits).serve()


class ChildCore:
    """The core's end of the pipe: commands in, steps and answers out."""

    def __init__(self, conn: Connection, backend: Any, limits: BatchLimits) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._core = LocalCore(backend, limits, self._publish)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="llm-stream-admit")
        info = ProcessInfo(
            backend.model_id,
            backend.version,
            backend.device,
            backend.execution,
            dict(backend.sampling_defaults),
            backend.tool_format,
        )
        self._send(("ready", info))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _publish(self, step: PublishedStep) -> None:
        try:
            self._send(("step", step))
        except (pickle.PicklingError, TypeError, AttributeError):
            # An error event that cannot cross the pipe: send what it said instead.
            self._send(("step", _portable(step)))

    def _admit(self, request_id: int, items: list[tuple[int, GenerationRequest]]) -> None:
        try:
            results = self._core.admit_now(items)
        except Exception as exc:  # the whole group was turned away
            self._send(("admitted", request_id, None, _portable_error(exc)))
            return
        self._send(("admitted", request_id, [_portable_error(e) for e in results], None))

    def serve(self) -> None:
        timeout_s = _CLOSE_GRACE_S
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):  # the server is gone: stop
                break
            kind = message[0]
            if kind == "admit":
                self._pool.submit(self._admit, message[1], message[2])
            elif kind == "cancel":
                self._core.cancel(message[1])
            elif kind == "cancel_all":
                self._core.cancel_all()
            elif kind == "close":
                timeout_s = float(message[1])
                break
        self._pool.shutdown(wait=True)
        started = time.monotonic()
        self._core.close_now(timeout_s)
        log.debug("engine core stopped in %.1f s", time.monotonic() - started)
        with contextlib.suppress(OSError, ValueError):
            self._send(("closed",))


def _portable_error(error: BaseException | None) -> Exception | None:
    """``error`` if it survives pickling, else a RuntimeError saying what it was."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error if isinstance(error, Exception) else RuntimeError(repr(error))


def _portable(step: PublishedStep) -> PublishedStep:
    events = [
        (key, [_portable_error(e) if isinstance(e, BaseException) else e for e in items])
        for key, items in step.events
    ]
    return replace(step, events=events)  # type: ignore[arg-type]
