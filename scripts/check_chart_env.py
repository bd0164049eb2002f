"""Check the chart against the server's real flag parser (run with the project's .venv).

For every container in the rendered manifests that sets ``LLM_STREAM_*`` variables,
``llm_stream.cli.parse_settings`` must accept its environment and arguments, as the
server would at start. Over all files given, every server flag must be set at least
once: every flag is reachable from the chart's values.

Usage: .venv/bin/python scripts/check_chart_env.py RENDERED.yaml...
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from llm_stream.cli import build_parser, env_name, parse_settings


def server_flags() -> set[str]:
    flags: set[str] = set()
    for action in build_parser()._actions:
        flags.update(s for s in action.option_strings if s.startswith("--") and s != "--help")
    return flags


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


def main(argv: list[str]) -> int:
    flags = server_flags()
    seen: set[str] = set()
    failures = 0
    for name in argv:
        for doc in yaml.safe_load_all(Path(name).read_text(encoding="utf-8")):
            if not doc or doc.get("kind") not in {"Deployment", "StatefulSet", "DaemonSet"}:
                continue
            for container in containers(doc):
                env = {
                    e["name"]: str(e["value"])
                    for e in container.get("env", [])
                    if e["name"].startswith("LLM_STREAM_") and "value" in e
                }
                if not env:
                    continue
                seen.update(env)
                where = f"{name}: {doc['kind']}/{doc['metadata']['name']} {container['name']}"
                stderr = io.StringIO()
                try:
                    with contextlib.redirect_stderr(stderr):
                        parse_settings([str(a) for a in container.get("args", [])], environ=env)
                except SystemExit:
                    failures += 1
                    message = stderr.getvalue().strip().splitlines()[-1:]
                    sys.stdout.write(f"FAIL {where}: the server rejects it: {message}\n")
                    continue
                sys.stdout.write(f"ok   {where}: {len(env)} LLM_STREAM_* variables parse\n")
    unreached = sorted(f for f in flags if env_name(f) not in seen)
    if unreached:
        failures += 1
        sys.stdout.write(f"FAIL flags never set by the chart: {', '.join(unreached)}\n")
    else:
        sys.stdout.write(f"ok   all {len(flags)} server flags are reachable from values\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
