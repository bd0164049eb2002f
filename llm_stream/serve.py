"""``python -m llm_stream.serve``: run the server until SIGTERM/SIGINT, then drain.

Exit status: 0 after a clean drain, 1 when a model cannot be loaded or its engine
process dies, 2 for bad flags.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from llm_stream.app import LLMStreamServer
from llm_stream.cli import parse_settings
from llm_stream.errors import ModelLoadError
from llm_stream.logging_setup import configure_logging
from llm_stream.runtime import tune_openmp
from llm_stream.settings import Settings

log = logging.getLogger("llm_stream.serve")


async def run(settings: Settings) -> int:
    try:
        server = LLMStreamServer(settings)
        await server.start()
    except OSError as exc:
        log.error("%s", exc)
        return 1
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    assert server.ready is not None
    stopper = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({server.ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failure = server.ready.exception() if server.ready.done() else None
    if failure is not None:
        if isinstance(failure, ModelLoadError):
            log.error("cannot start: %s", failure)
        else:
            log.error("cannot start: model load or warm-up failed", exc_info=failure)
        stopper.cancel()
        await server.drain(grace_s=0)
        return 1
    failed = asyncio.create_task(server.failed.wait())
    await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
    if failed.done() and not stopper.done():
        stopper.cancel()
        await server.drain(grace_s=0)
        return 1
    failed.cancel()
    log.info("shutdown signal received")
    # A second signal while draining stops the remaining generations at once.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.engine.stop_all)
    await server.drain()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    tune_openmp()
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(run(settings))
    return int(uvloop.run(run(settings)))


if __name__ == "__main__":
    sys.exit(main())
