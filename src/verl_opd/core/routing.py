"""Which of several teachers (``opd.teachers``) scores a sample: pure Python, no verl import.

One rule, used by the driver's pre-flight scan of the data files (:mod:`verl_opd.checks.inputs`) and by
the reference worker on every step (:class:`verl_opd.glue.teacher_worker.TeacherSet`), so a file that
passes the scan is routed the same way in the run: a sample's teacher is the one its dataset field
``opd.teacher_field`` names when that field is set, else the one whose ``data_sources`` list its
``data_source``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def dotted_field(fields: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (``extra_info.teacher``) in a sample's fields; None where any part is absent."""
    value: Any = fields
    for part in key.split("."):
        if not isinstance(value, Mapping) or value.get(part) is None:
            return None
        value = value[part]
    return value


@dataclass(frozen=True)
class TeacherRoutes:
    """The teachers' names in order and the ``data_source`` values each one scores."""

    names: tuple[str, ...]
    by_source: Mapping[str, int]

    @classmethod
    def of(cls, data_sources: Mapping[str, Sequence[str]]) -> TeacherRoutes:
        """Routes from ``{teacher name: its data_source values}`` (each value listed once, as config checks)."""
        names = tuple(data_sources)
        return cls(names, {source: names.index(name) for name, sources in data_sources.items() for source in sources})

    def index(self, data_source: Any, named: Any = None) -> int | None:
        """The index of the teacher scoring a sample; None when nothing covers it.

        ``named`` is the sample's ``opd.teacher_field`` value (None when the field is unset or absent):
        it takes precedence; a name that is no teacher's gives None, never a fallback to ``data_source``.
        """
        if named is not None:
            return self.names.index(named) if named in self.names else None
        return self.by_source.get(data_source)

    def uncovered(self, samples: Sequence[tuple[Any, Any]]) -> tuple[list[str], list[str]]:
        """``(data_source values no teacher covers, teacher names that are no teacher's)`` among ``samples``.

        ``samples`` are ``(data_source, named)`` pairs; each problem value is listed once, sorted.
        """
        sources, names = set(), set()
        for source, named in samples:
            if self.index(source, named) is None:
                (names if named is not None else sources).add(str(named if named is not None else source))
        return sorted(sources), sorted(names)
