"""Process-wide settings for the native libraries, applied before torch is imported.

The model runs on its scheduler thread while the event loop, gRPC's threads and
the preparation pool share the same cores. OpenMP's default keeps idle worker
threads spinning for a long while (libgomp: 300,000 rounds); a spinning team
then fights every other runnable thread for the CPU, and each of the hundreds
of parallel regions in a forward pass can stall for a whole scheduler time
slice. Letting workers sleep at once (OMP_WAIT_POLICY=PASSIVE) cures that but
pays a wake-up in every region. A short spin is best of both: measured on a
2-core machine with SmolLM2-135M in a thread beside a busy event loop, a 32-row
decode step took 3.9 s with the default, 181 ms passive and 100 ms with
GOMP_SPINCOUNT=8000; a one-prompt prefill 182 ms passive and about 145 ms with it.
Whatever the operator set explicitly is kept.
"""

from __future__ import annotations

import os
import sys

# libgomp (PyTorch's Linux wheels): spin rounds before a worker sleeps.
SPIN_ROUNDS = "8000"
# LLVM/Intel OpenMP (e.g. macOS wheels): milliseconds a worker spins before sleeping.
BLOCK_TIME_MS = "1"


def tune_openmp() -> None:
    """Make idle OpenMP workers spin briefly, then sleep, unless the operator chose."""
    if "torch" in sys.modules:  # too late to matter: the OpenMP runtime has started
        return
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_ROUNDS)
    os.environ.setdefault("KMP_BLOCKTIME", BLOCK_TIME_MS)
