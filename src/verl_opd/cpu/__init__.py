"""CPU backend for verl: a ``cpu`` platform and an ``hf`` rollout server.

:func:`register` puts both into verl's registries; it runs in every verl process
through the plugin entry point. This module imports nothing from verl at import
time: it is itself imported while verl initialises (verl loads plugins from its
own ``__init__``), so the verl-facing modules are imported inside :func:`register`.
:func:`verl_opd.cpu.settings.apply_cpu_settings` turns ``trainer.device=cpu`` into
the settings a CPU run needs.
"""

from __future__ import annotations

import os

PLATFORM_NAME = "cpu"
ROLLOUT_NAME = "hf"
ROLLOUT_ADAPTER = "verl_opd.cpu.rollout.HFServerAdapter"


def _load_hf_replica() -> type:
    from verl_opd.cpu.rollout import HFReplica

    return HFReplica


def cpu_platform_selected() -> bool:
    """True in a process whose verl platform is this package's CPU platform."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


def register() -> None:
    """Register the ``cpu`` platform and the ``hf`` rollout backend with verl."""
    from verl.plugin.platform import PlatformRegistry
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_opd.cpu.platform import PlatformCPU
    from verl_opd.glue.patches import install_backend_dedup

    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_hf_replica)
    # verl keeps the worker-side rollout classes in a plain module-level table.
    rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ROLLOUT_ADAPTER
    if cpu_platform_selected():
        install_backend_dedup()
