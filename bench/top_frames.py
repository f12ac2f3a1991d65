"""Top frames of a py-spy raw profile (``--format raw``) under one function, as percentages.

    .venv/bin/python bench/top_frames.py bench/results/backlog-flame.txt run_pass

Prints the inclusive share of the busiest frames, then the busiest by self time: the two
lists the issue-10 notes quote as "top frames", before and after a change.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

SHOWN = 25


def _name(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (file.py)``."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1].split(':', 1)[0]})" if where else func


def main() -> None:
    """Read the raw profile and print both tables."""
    path, root = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if root and not any(root in f for f in frames):
            continue
        samples = int(count)
        total += samples
        for name in {_name(f) for f in frames}:
            inclusive[name] += samples
        own[_name(frames[-1])] += samples
    if not total:
        sys.exit(f"no samples under {root!r} in {path}")
    print(f"{total} samples under {root or 'the whole process'}")
    print("inclusive:")
    for name, samples in inclusive.most_common(SHOWN):
        print(f"  {100 * samples / total:5.1f} %  {name}")
    print("self:")
    for name, samples in own.most_common(SHOWN):
        print(f"  {100 * samples / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
