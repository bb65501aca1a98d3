"""What ``trainer.device=cpu`` means for a verl PPO config.

Each entry below answers one blocker met when running verl's real trainer on a
CPU-only machine (see ``docs`` in the README). Settings are applied to the
composed Hydra config in the driver, before verl validates it, and every change
is logged, so a user sees exactly what the CPU switch did.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from verl_opd.checks.resources import required_cpu_ray
from verl_opd.config.opd_config import mixed_precision
from verl_opd.cpu import PLATFORM_NAME, ROLLOUT_NAME

logger = logging.getLogger(__name__)

# Environment every process of a CPU run needs: verl's platform, and the FSDP engine,
# which verl registers for device "cuda" only (it runs unchanged on host tensors).
CPU_ENV = {"VERL_PLATFORM": PLATFORM_NAME, "VERL_ENGINE_DEVICE": "cuda"}


def _rule(key: str, value: Any, when: Callable[[Any], bool]) -> tuple[str, Any, Callable[[Any], bool]]:
    return key, value, when


def _cpu_rules(config: DictConfig) -> list[tuple[str, Any, Callable[[Any], bool]]]:
    logical_gpus, logical_cpus = required_cpu_ray(config)
    return [
        # Ray: logical GPUs so verl's placement groups form, and logical CPUs for their bundles and the
        # actors outside them (on 2 cores too), whatever the number of workers.
        _rule("ray_kwargs.ray_init.num_gpus", logical_gpus, lambda v: v is None),
        _rule("ray_kwargs.ray_init.num_cpus", logical_cpus, lambda v: v is None or v < logical_cpus),
        _rule("ray_kwargs.ray_init.include_dashboard", False, lambda v: v is None),
        # One TransferQueue storage actor: each one wants a CPU of its own.
        _rule("transfer_queue.backend.SimpleStorage.num_data_storage_units", 1, lambda v: v != 1),
        # verl's defaults start 8 agent-loop, 8 reward and 8 data-loader processes, each importing
        # verl and torch: minutes of start-up on a laptop for no gain at CPU batch sizes.
        _rule("actor_rollout_ref.rollout.agent.num_workers", 1, lambda v: v is not None and v > 1),
        _rule("reward.num_workers", 1, lambda v: v is not None and v > 1),
        _rule("data.dataloader_num_workers", 0, lambda v: v is not None and v > 0),
        # FlashAttention does not exist on CPU.
        _rule("actor_rollout_ref.model.override_config.attn_implementation", "sdpa", lambda v: v != "sdpa"),
        # FSDP1 refuses CPU parameters with sync_module_states; FSDP2 works.
        _rule("actor_rollout_ref.actor.strategy", "fsdp2", lambda v: v != "fsdp2"),
        _rule("actor_rollout_ref.ref.strategy", "fsdp2", lambda v: v != "fsdp2"),
        _rule("critic.strategy", "fsdp2", lambda v: v != "fsdp2"),
        # bf16 on CPU is slow and quantises log-probs; train and score in fp32.
        _rule("actor_rollout_ref.actor.fsdp_config.mixed_precision", mixed_precision("fp32"), lambda v: v is None),
        _rule("actor_rollout_ref.ref.fsdp_config.mixed_precision", mixed_precision("fp32"), lambda v: v is None),
        # The only rollout server that runs without a GPU; it is one process per replica.
        _rule("actor_rollout_ref.rollout.name", ROLLOUT_NAME, lambda v: v != ROLLOUT_NAME),
        _rule("actor_rollout_ref.rollout.tensor_model_parallel_size", 1, lambda v: v != 1),
    ]


def apply_cpu_settings(config: DictConfig) -> list[str]:
    """Make ``config`` runnable on CPU; return the ``key=value`` changes made.

    Only values that cannot work on CPU, or that only cost start-up time there, are
    replaced; compatible user choices stay.
    Also exports :data:`CPU_ENV` to this process (Ray workers inherit it) and to
    Ray's runtime environment.
    """
    changes: list[str] = []
    with open_dict(config):
        for key, value, when in _cpu_rules(config):
            if OmegaConf.select(config, key.rsplit(".", 1)[0]) is None:
                continue  # e.g. no critic section in this config
            current = OmegaConf.select(config, key)
            if isinstance(current, DictConfig):
                current = OmegaConf.to_container(current)
            if when(current):
                OmegaConf.update(config, key, value, force_add=True)
                changes.append(f"{key}={value}")
        for name, value in CPU_ENV.items():
            OmegaConf.update(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{name}", value, force_add=True)
    os.environ.update(CPU_ENV)
    if changes:
        logger.warning("verl-opd: trainer.device=cpu applied: %s", ", ".join(changes))
    return changes


def activate_cpu_platform() -> None:
    """Make this (driver) process use the CPU platform, even if verl already resolved another."""
    from verl.plugin.platform import get_platform, set_platform

    from verl_opd.cpu.platform import PlatformCPU
    from verl_opd.glue.patches import install_backend_dedup

    os.environ.update(CPU_ENV)
    if get_platform().device_name != "cpu":
        set_platform(PlatformCPU())
    install_backend_dedup()
