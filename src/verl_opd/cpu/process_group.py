"""The one monkeypatch of the CPU backend: de-duplicate torch's process-group backend string.

verl builds its backend as ``f"cpu:gloo,{device}:{backend}"``. On the CPU platform
that is ``"cpu:gloo,cpu:gloo"``, which torch rejects ("Duplicate device type cpu").
verl offers no hook for that string, so :func:`install_backend_dedup` wraps
``torch.distributed.init_process_group`` to drop repeated ``device:backend`` entries.
It is installed only in processes whose platform is ``cpu`` and only once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.distributed

_MARKER = "_verl_opd_backend_dedup"


def dedup_backend(backend: str | None) -> str | None:
    """``"cpu:gloo,cpu:gloo"`` -> ``"cpu:gloo"``; anything without a repeated device is unchanged."""
    if not isinstance(backend, str) or "," not in backend:
        return backend
    seen: dict[str, str] = {}
    for entry in backend.split(","):
        device = entry.split(":", 1)[0] if ":" in entry else entry
        seen.setdefault(device, entry)
    return ",".join(seen.values())


def install_backend_dedup() -> None:
    """Wrap ``torch.distributed.init_process_group`` (idempotent)."""
    original = torch.distributed.init_process_group
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        if "backend" in kwargs:
            kwargs["backend"] = dedup_backend(kwargs["backend"])
        elif args:
            args = (dedup_backend(args[0]), *args[1:])
        return original(*args, **kwargs)

    setattr(init_process_group, _MARKER, True)
    torch.distributed.init_process_group = init_process_group
