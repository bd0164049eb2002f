"""CUDA graphs of the decode forward: one per (rows, width) bucket, replayed every step.

An eager decode step of a Hugging Face model is hundreds of small kernel
launches from Python: on a fast GPU the launches, not the kernels, set its
pace. Captured once as a CUDA graph, the same forward replays with one launch.
A graph has fixed shapes, so the batch's rows are padded up to a rows bucket
(padded rows compute on free slots and are ignored) and attention reads a
width bucket of positions, the smallest that holds every row: attention costs
what the rows' real lengths need, within a bucket's rounding, never the whole
capacity. All graphs share one memory pool, captured largest first, since
only one replays at a time. Before (or without) capture the buckets run
eagerly, with the same shapes: that is how the CPU tests exercise padding and
widths, and how the GPU tests check a graph against the eager step it captured.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Attention widths below this cost no more than this one does.
_SMALLEST_WIDTH = 256


def rows_buckets(most: int) -> list[int]:
    """1, 2, 4, 8, then every 8 rows, up to ``most`` (included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < most]
    buckets += list(range(16, most, 8))
    return sorted({*buckets, most})


def width_buckets(most: int, smallest: int = _SMALLEST_WIDTH) -> list[int]:
    """Doubling widths from ``smallest`` up to ``most`` (included)."""
    buckets = []
    width = smallest
    while width < most:
        buckets.append(width)
        width *= 2
    return [*buckets, most]


@dataclass(frozen=True)
class CaptureReport:
    graphs: int
    seconds: float
    pool_bytes: int


Forward = Callable[[int, int], torch.Tensor]


class DecodeGraphs:
    """The decode forward by (rows, width) bucket: captured graphs, or eager runs."""

    def __init__(self, rows: Sequence[int], widths: Sequence[int], forward: Forward) -> None:
        self.rows = sorted(rows)
        self.widths = sorted(widths)
        self._forward = forward
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def bucket(self, rows: int, width: int) -> tuple[int, int]:
        """The smallest bucket holding ``rows`` rows of ``width`` positions."""
        r = bisect.bisect_left(self.rows, rows)
        w = bisect.bisect_left(self.widths, width)
        if r == len(self.rows) or w == len(self.widths):
            raise ValueError(f"{rows} rows x {width} positions exceed every captured bucket")
        return self.rows[r], self.widths[w]

    def capture(self, device: torch.device) -> CaptureReport:
        """Capture the forward for every bucket (raises torch.OutOfMemoryError)."""
        forward = self._forward
        started = time.monotonic()
        torch.cuda.synchronize(device)
        reserved = torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        for rows in reversed(self.rows):
            for width in reversed(self.widths):
                # A first eager run on a side stream initialises what the kernels need
                # (library handles, workspaces) outside the capture.
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    forward(rows, width)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = forward(rows, width)
                self._graphs[(rows, width)] = (graph, logits)
        torch.cuda.synchronize(device)
        return CaptureReport(
            len(self._graphs),
            time.monotonic() - started,
            torch.cuda.memory_reserved(device) - reserved,
        )

    def replay(self, rows: int, width: int) -> torch.Tensor:
        """Run the bucket's graph (or the forward, uncaptured): logits ``[bucket rows, vocab]``."""
        bucket = self.bucket(rows, width)
        captured = self._graphs.get(bucket)
        if captured is None:
            return self._forward(*bucket)
        graph, logits = captured
        graph.replay()
        return logits
