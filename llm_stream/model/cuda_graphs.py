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
from typing import Any

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
    """A forward by (size, width) bucket: captured graphs, or eager runs.

    The size is a decode step's rows, or a staged prompt chunk's tokens.
    """

    def __init__(self, sizes: Sequence[int], widths: Sequence[int], forward: Forward) -> None:
        self.sizes = sorted(sizes)
        self.widths = sorted(widths)
        self._forward = forward
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def bucket(self, size: int, width: int) -> tuple[int, int]:
        """The smallest bucket holding ``size`` rows (or tokens) of ``width`` positions."""
        r = bisect.bisect_left(self.sizes, size)
        w = bisect.bisect_left(self.widths, width)
        if r == len(self.sizes) or w == len(self.widths):
            raise ValueError(f"{size} x {width} positions exceed every captured bucket")
        return self.sizes[r], self.widths[w]

    def capture(self, device: torch.device, pool: Any) -> CaptureReport:
        """Capture the forward for every bucket into ``pool`` (one pool serves every
        graph of a model: only one replays at a time). Raises torch.OutOfMemoryError."""
        forward = self._forward
        started = time.monotonic()
        torch.cuda.synchronize(device)
        reserved = torch.cuda.memory_reserved(device)
        side = torch.cuda.Stream(device)
        for rows in reversed(self.sizes):
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

    def replay(self, size: int, width: int) -> torch.Tensor:
        """Run the bucket's graph (or the forward, uncaptured); returns its logits."""
        bucket = self.bucket(size, width)
        captured = self._graphs.get(bucket)
        if captured is None:
            return self._forward(*bucket)
        graph, logits = captured
        graph.replay()
        return logits
