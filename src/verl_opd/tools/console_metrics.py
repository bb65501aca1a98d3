"""Read the per-step metrics that verl's console logger prints.

verl prints one line per training step, ``step:N - key:value - key:value ...``.
Tests, the demo and the benchmarks read a real ``main_ppo`` run's numbers from it.
"""

from __future__ import annotations

import re

_STEP_LINE = re.compile(r"step:(\d+) - (.*)$")
_WRAPPED_NUMBER = re.compile(r"^np\.\w+\((.*)\)$")


def _to_float(value: str) -> float | None:
    value = value.strip()
    wrapped = _WRAPPED_NUMBER.match(value)
    if wrapped:
        value = wrapped.group(1)
    try:
        return float(value)
    except ValueError:
        return None


def parse_step_metrics(text: str) -> dict[int, dict[str, float]]:
    """``{step: {metric: value}}`` for every console step line in ``text`` (non-numbers skipped)."""
    steps: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        match = _STEP_LINE.search(line)
        if not match:
            continue
        metrics: dict[str, float] = {}
        for item in match.group(2).split(" - "):
            key, _, value = item.partition(":")
            number = _to_float(value)
            if key and number is not None:
                metrics[key.strip()] = number
        steps[int(match.group(1))] = metrics
    return steps
