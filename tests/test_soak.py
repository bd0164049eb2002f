"""scripts/soak.py against the tiny model: twice the capacity, and every call accounted for.

The script runs as users run it, in a process of its own that starts its own server, so
the SIGTERM at the end and the server's exit status are real too.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SOAK = REPO / "scripts" / "soak.py"
MAX_REQUESTS = 250
DURATION_S = 20


@functools.cache
def soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_soak_overload_loses_nothing(tiny_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    """C=2, Q=2 and 8 clients: some calls are turned away, none errs or is lost."""
    out = tmp_path / "soak.json"
    command = [
        sys.executable,
        str(SOAK),
        *("--model", f"tiny={tiny_model_dir}", "--max-concurrent", "2", "--max-queue", "2"),
        *("--duration", str(DURATION_S), "--max-requests", str(MAX_REQUESTS)),
        *("--json", str(out), "--server-log", str(tmp_path / "server.log")),
        # Deadlines short enough to expire whatever this machine's speed: the default
        # (a fraction of the warm-up's time) can outlast the tiny model's answers.
        *("--deadline", "0.005,0.05"),
        f"--server-arg=--cache-dir={cache_dir}",
    ]
    run = subprocess.run(
        command, check=False, cwd=REPO, capture_output=True, text=True, timeout=150
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    counts = summary["counts"]
    assert summary["clients"] == 8
    assert (counts["error"], counts["lost"], counts["incoherent"]) == (0, 0, 0), summary["errors"]
    for outcome in ("completed", "rejected", "cancelled", "deadline"):
        assert counts[outcome] > 0, (outcome, counts)
    assert summary["unary_counts"]["completed"] > 0
    assert summary["rejected_without_pushback"] == 0
    # Every call is classified exactly once, and the count bound holds.
    assert sum(counts.values()) == summary["sent"] <= MAX_REQUESTS
    assert summary["sent"] == MAX_REQUESTS or summary["seconds"] >= DURATION_S
    assert summary["server_rejected"].get("RESOURCE_EXHAUSTED") == counts["rejected"]
    assert summary["in_flight_after"] == 0
    assert summary["exit_status"] == 0
    assert all(check["ok"] for check in summary["checks"])
    assert "| **lost streams** (must be 0) | 0 |" in run.stdout


@pytest.mark.parametrize("host", ["10.0.0.1", "0.0.0.0", "::", "example.com"])
def test_soak_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a loopback address"):
        soak_module().loopback_host(host)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]"])
def test_soak_accepts_loopback_hosts(host: str) -> None:
    assert soak_module().loopback_host(host) in {"127.0.0.1", "::1"}
