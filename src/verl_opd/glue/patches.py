"""verl-opd's only three monkeypatches, each tiny, guarded (idempotent, narrow) and tested.

1. :func:`install_config_hook` wraps ``verl.utils.device.auto_set_device``. Every verl
   entry point calls it on the freshly composed config before ``validate_config``;
   verl has no other driver-side hook where a plugin can see and complete the config
   (``trainer.device=cpu``, ``algorithm.adv_estimator=opd``) before anything starts.
2. :func:`install_backend_dedup` wraps ``torch.distributed.init_process_group`` on the
   CPU platform only. verl builds its backend as ``f"cpu:gloo,{device}:{backend}"``,
   which is ``"cpu:gloo,cpu:gloo"`` there, and torch rejects the duplicate device; and a
   one-process group whose ``MASTER_PORT`` was taken in the meantime retries on a free port.
3. :func:`install_placement_timeout` wraps the ``placement_group`` name inside verl's
   ``single_controller.ray.base`` only: verl waits for its placement groups without a
   timeout, so a request an existing Ray cluster cannot place would hang forever.
"""

from __future__ import annotations

import functools
import os
import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


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
        try:
            return original(*args, **kwargs)
        except torch.distributed.DistNetworkError as exc:
            # verl picks MASTER_PORT by binding port 0 and closing the socket (single_controller/base/worker.py:59),
            # so another process can take it before the store binds it. A single-process group has no peer that
            # needs that port: retry once on a fresh one. Larger groups re-raise (their ranks share the port).
            if "EADDRINUSE" not in str(exc) or int(kwargs.get("world_size", os.environ.get("WORLD_SIZE", 1))) != 1:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
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


def install_placement_timeout(base_module: Any) -> None:
    """Give each of verl's placement groups a deadline (idempotent); ``base_module`` is verl's ray ``base``.

    ``RayResourcePool.get_placement_groups`` creates its groups with the module-level name
    ``placement_group`` and then waits on ``ray.get([pg.ready() ...])`` with no timeout
    (verl/single_controller/ray/base.py:155-160). Only that name is wrapped, in that module: each
    new group is waited for here, up to :func:`verl_opd.checks.resources.placement_timeout_s`, so verl's
    own wait returns at once, and a group an existing cluster cannot place ends the run with the
    keys to change instead of waiting forever (the local case is refused before Ray starts).
    """
    original = base_module.placement_group
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def placement_group(*args: Any, **kwargs: Any) -> Any:
        from verl_opd.checks.resources import PLACEMENT_TIMEOUT_ENV, ResourceError, placement_timeout_s

        group = original(*args, **kwargs)
        timeout = placement_timeout_s()
        if timeout is None or group.wait(timeout_seconds=timeout):
            return group
        from ray.util.placement_group import remove_placement_group

        bundles = kwargs.get("bundles", args[0] if args else None)
        remove_placement_group(group)
        raise ResourceError(
            f"Ray could not place {len(bundles or [])} bundle(s) of {bundles[0] if bundles else {}} on one node "
            f"within {timeout:g} s: the cluster lacks the GPUs or CPUs. Lower trainer.n_gpus_per_node / "
            f"trainer.nnodes to what the cluster's nodes have, or set {PLACEMENT_TIMEOUT_ENV}=<seconds> "
            "(0 = wait forever) where nodes are still joining."
        )

    setattr(placement_group, _MARKER, True)
    base_module.placement_group = placement_group
