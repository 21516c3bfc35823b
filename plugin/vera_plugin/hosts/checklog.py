"""What the host self-tests share: one report line per check, and checks that never stop the ones after them.

Host-free (no `nuke`, no Resolve API), so both self-tests and their tests use the same reporting.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path

Outcome = tuple[str, str]  # ("PASS" | "FAIL" | "SKIP", the value seen)


class CheckLog:
    """``lines`` holds the report, ``failures`` counts FAIL lines; each line also goes to ``out`` as it is made."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.lines: list[str] = []
        self.failures = 0

    def report(self, verdict: str, name: str, seen: str) -> None:
        """One line: ``PASS  name: seen``."""
        line = f"{verdict:<5} {name}: {seen}"
        self.lines.append(line)
        if verdict == "FAIL":
            self.failures += 1
        self.out(line)

    def check(self, name: str, test: Callable[[], Outcome]) -> bool:
        """Run one check; an exception is a FAIL showing the exception, never a traceback that stops the rest."""
        try:
            verdict, seen = test()
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            verdict, seen = (
                "FAIL",
                f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})",
            )
        self.report(verdict, name, seen)
        return verdict != "FAIL"
