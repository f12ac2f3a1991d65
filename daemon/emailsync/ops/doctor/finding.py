"""One line of the doctor's report (ok, note or problem, with its fix) and the exit code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# How much a finding matters; the exit code is 1 when any is a PROBLEM.
OK = "ok"
NOTE = "note"  # worth knowing, not a fault: exit code stays 0
PROBLEM = "problem"  # the mailbox will not work, or not as designed: exit code 1


@dataclass(frozen=True)
class Finding:
    """One line of the report."""

    check: str
    status: str  # OK, NOTE or PROBLEM
    detail: str
    fix: str | None = None

    def line(self) -> str:
        """The human-readable line (and the fix, when there is one)."""
        text = f"{self.status:8}{self.check:14}{self.detail}"
        return text + (f"\n{'':22}fix: {self.fix}" if self.fix else "")

    def as_json(self) -> dict[str, str | None]:
        """The ``doctor --json`` object for this line."""
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


def branch_table(branch: str | None) -> str:
    """Where a fix points in the config: the mailbox's [branches.NAME] table, if it has one."""
    return f"[branches.{branch}]" if branch else "the mailbox's server settings"


def duration(seconds: float) -> str:
    """A duration as a fix words it: minutes from two minutes up, else seconds."""
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def exit_code(findings: Sequence[Finding]) -> int:
    """0 when nothing is a problem, else 1."""
    return 1 if any(f.status == PROBLEM for f in findings) else 0
