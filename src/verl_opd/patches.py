"""verl-opd's only two monkeypatches, both tiny, guarded (idempotent, narrow) and tested.

1. :func:`install_config_hook` wraps ``verl.utils.device.auto_set_device``. Every verl
   entry point calls it on the freshly composed config before ``validate_config``;
   verl has no other driver-side hook where a plugin can see and complete the config
   (``trainer.device=cpu``, ``algorithm.adv_estimator=opd``) before anything starts.
2. :func:`install_backend_dedup` wraps ``torch.distributed.init_process_group`` on the
   CPU platform only. verl builds its backend as ``f"cpu:gloo,{device}:{backend}"``,
   which is ``"cpu:gloo,cpu:gloo"`` there, and torch rejects the duplicate device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.distributed

_MARKER = "_verl_opd_patched"


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


def install_config_hook(configure: Callable[[Any], None]) -> None:
    """Run ``configure(config)`` first whenever verl calls ``auto_set_device(config)`` (idempotent)."""
    import verl.utils.device as device

    original = device.auto_set_device
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def auto_set_device(config: Any) -> None:
        configure(config)
        original(config)

    setattr(auto_set_device, _MARKER, True)
    device.auto_set_device = auto_set_device
