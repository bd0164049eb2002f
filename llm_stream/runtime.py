"""Process-wide settings for the native libraries, applied before torch is imported.

The model runs on its scheduler thread while the event loop, gRPC's threads and
the preparation pool share the same cores. OpenMP's default is to keep idle
worker threads spinning; a spinning team then fights every other runnable thread
for the CPU, and each of the hundreds of parallel regions in a forward pass can
stall for a whole scheduler time slice. Measured on a 2-core machine with
SmolLM2-135M: a 32-row decode step took 3.9 s with spinning workers and 0.18 s
with passive ones. A value the operator set explicitly is kept.
"""

from __future__ import annotations

import os
import sys


def prefer_passive_openmp() -> None:
    """Make idle OpenMP workers sleep instead of spin, unless OMP_WAIT_POLICY is set."""
    if "torch" in sys.modules:  # too late to matter: the OpenMP runtime has started
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
