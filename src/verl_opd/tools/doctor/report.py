"""One result line of the doctor, and the names every check module shares."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
SECTIONS = ("versions", "plugin", "tokenizers", "config", "plan", "selftest")
SUMMARY = "``verl-opd doctor``: pre-flight checks for an OPD run, before any GPU time is spent."


@dataclass(frozen=True)
class Check:
    """One result line: section, what was checked, ``PASS``/``WARN``/``FAIL``/``SKIP``, and why."""

    section: str
    name: str
    status: str
    detail: str

    def line(self) -> str:
        head = f"{self.status:<4}  [{self.section}] {self.name}"
        if not self.detail:
            return head
        first, *rest = self.detail.strip().splitlines() or [""]
        text = f"{head}: {first}"
        if rest:
            text += "\n" + textwrap.indent("\n".join(rest), " " * 6)
        return text
