"""scripts/chaos.py --quick: rollouts and crashes under load through two real Envoys.

Run as users run it, in a process of its own that starts its replicas (the tiny model)
and Envoys; its own checks are the deployment's targets (no stream cut by a rollout,
a crash ends streams UNAVAILABLE within 2 s, a frozen replica ejected within 10 s, its
streams ended by the keepalive). The JSON rows are asserted here too, so a script
whose checks went soft would still fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHAOS = REPO / "scripts" / "chaos.py"

pytestmark = pytest.mark.deploy


def test_chaos_quick_meets_the_targets(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "chaos.json"
    command = [
        sys.executable, str(CHAOS), "--quick", "--model", f"tiny={tiny_model_dir}",
        "--cache-dir", str(cache_dir), "--workdir", str(tmp_path / "work"), "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {row["scenario"]: row for row in report["rows"]}
    assert list(rows) == [
        "rolling replicas",
        "rolling envoys",
        "SIGKILL replica",
        "SIGKILL envoy",
        "frozen replica",
    ]
    for name, row in rows.items():
        assert row["in_flight_at_event"] > 0, name
        assert row["unary_failed"] == 0 and row["unary_ok"] > 0, (name, row)
        assert row["failed_before_token"] == 0 and not row["lost_or_incoherent"], (name, row)
        assert row["whole"] + row["cut"] == row["streams"], (name, row)
    for name in ("rolling replicas", "rolling envoys"):
        assert rows[name]["cut"] == 0, rows[name]
    for name in ("SIGKILL replica", "SIGKILL envoy"):
        assert rows[name]["cut"] > 0, rows[name]  # the kill hit streams in flight
        assert rows[name]["cut_codes"] == ["UNAVAILABLE"], rows[name]
        assert rows[name]["learn_s"] <= 2.0, rows[name]
    frozen = rows["frozen replica"]
    assert frozen["healthy_path_s"] <= 10.0, frozen
    assert set(frozen["cut_codes"]) <= {"UNAVAILABLE"}, frozen
    assert frozen["learn_s"] is None or frozen["learn_s"] <= 23.0, frozen  # keepalive 15+15 %+5 s
    assert all(passed for passed, _ in report["checks"]), report["checks"]
    assert "| rolling replicas |" in done.stdout  # the table users read
