"""Summarise a py-spy raw (collapsed stacks) profile: per thread, where the time goes.

``py-spy record --threads --nonblocking -f raw -o FILE -p PID`` writes one line per
distinct stack, ``thread (tid);frame;frame... count``. This prints, for each
thread, its share of the samples, the functions with the most samples anywhere
on the stack (inclusive) and the innermost frames (self), so a profile taken on
another machine can be read from a few lines of text.

    .venv/bin/python scripts/profile_summary.py profile.txt [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_FRAME = re.compile(r"^(?P<function>[^ (]+) \((?P<file>[^:)]+)(?::\d+)?\)$")


def short(frame: str) -> str:
    """``function (path/to/module.py:12)`` as ``module.py:function``."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['file'].rsplit('/', 1)[-1]}:{match['function']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    per_thread: collections.Counter[str] = collections.Counter()
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(args.profile, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            parts = stack.split(";")
            thread, frames = parts[0], parts[1:]
            if thread.startswith("process "):  # py-spy --subprocesses: a command line may hold ';'
                at = next((i for i, p in enumerate(parts) if p.startswith("thread (")), None)
                if at is not None:
                    owner = [p for p in parts[:at] if p.startswith("process ")][-1]
                    pid = owner.split(":", 1)[0].removeprefix("process ")
                    thread, frames = f"pid {pid} {parts[at]}", parts[at + 1 :]
            per_thread[thread] += count
            names = [short(f) for f in frames]
            for name in set(names):
                inclusive[thread][name] += count
            if names:
                own[thread][names[-1]] += count
    total = sum(per_thread.values()) or 1
    out = sys.stdout.write
    out(f"{total} samples\n")
    for thread, count in per_thread.most_common():
        out(f"\n## {thread}: {count} samples ({count / total:.0%})\n")
        out(
            "inclusive: "
            + "; ".join(
                f"{name} {n / count:.0%}" for name, n in inclusive[thread].most_common(args.top)
            )
            + "\n"
        )
        out(
            "self: "
            + "; ".join(f"{name} {n / count:.0%}" for name, n in own[thread].most_common(args.top))
            + "\n"
        )


if __name__ == "__main__":
    main()
