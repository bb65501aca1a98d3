"""The command line's Hydra overrides, read with Hydra's own parser.

"Did the user set this key?" cannot be read from a composed config (a default and an
explicit value look the same), only from the overrides. ``main_ppo`` runs under
``@hydra.main`` (verl/trainer/main_ppo.py:166), so while verl-opd's driver hook runs
the overrides are in :class:`hydra.core.hydra_config.HydraConfig`; the doctor passes
its own list explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


def parse(overrides: Sequence[str]) -> list[Override]:
    """``overrides`` parsed by Hydra (raises Hydra's ``OverrideParseException`` on a malformed one)."""
    return OverridesParser.create().parse_overrides(list(overrides))


def given_keys(overrides: Sequence[str]) -> set[str]:
    """Keys the overrides set, add or delete, without their ``+``/``++``/``~`` prefix."""
    return {override.key_or_group for override in parse(overrides)}


def value(overrides: Sequence[str], key: str) -> str | None:
    """The value the overrides give ``key`` (the last one wins), as a string; None if they do not set it."""
    found = None
    for override in parse(overrides):
        if override.key_or_group == key and not override.is_delete():
            found = str(override.value())
    return found


def without(overrides: Sequence[str], key: str) -> list[str]:
    """``overrides`` minus those that set, add or delete ``key``."""
    return [item for item, override in zip(overrides, parse(overrides), strict=True) if override.key_or_group != key]


def from_hydra() -> list[str] | None:
    """The task overrides of the running ``@hydra.main`` application, or None outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)
