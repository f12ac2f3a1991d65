"""Code run in a child Python, for what would take the test process with it (a kill, a
stack overflow)."""

from __future__ import annotations

import subprocess
import sys


def python_child(code: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (``python -c code args``); its output is captured
    as text and its exit code left to the caller."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
