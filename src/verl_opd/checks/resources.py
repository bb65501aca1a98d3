"""What a run asks of Ray, checked against what this machine can give, before Ray starts.

verl creates its placement groups and then waits for them with ``ray.get`` and no
timeout (verl/single_controller/ray/base.py:160): a request Ray cannot satisfy waits
forever, with only the autoscaler's "No available node types can fulfill resource
request" every 35 s. So every run through verl-opd's driver hook (GRPO too) is checked
here first, with an error naming the keys to change. What cannot be seen before Ray
starts (an existing cluster's nodes) is covered by a placement timeout
(:func:`verl_opd.glue.patches.install_placement_timeout`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from verl_opd.config.opd_config import OPDConfigError

logger = logging.getLogger(__name__)

# trainer.device=cpu: one worker process on one (local) node unless the command line says otherwise.
# verl's own default, n_gpus_per_node=8 (trainer/config/ppo_trainer.yaml:171), asks a local Ray for 8
# GPU bundles of 3 CPUs each and waits forever.
CPU_DEFAULTS = {"trainer.n_gpus_per_node": 1, "trainer.nnodes": 1}

# Each bundle of verl's placement groups asks for max_colocate_count CPUs (base.py:146), 3 by default
# (ResourcePoolManager, base.py:192), besides its one GPU.
CPUS_PER_BUNDLE = 3
# CPUs outside the placement groups: TransferQueue's controller and storage actors hold one each
# (transfer_queue/controller.py:943, storage/simple_storage.py:722), and the TaskRunner, agent-loop and
# reward-loop actors each need a free one to be scheduled. 3 + 5 = 8 was measured to run one CPU worker.
SPARE_CPUS = 5

PLACEMENT_TIMEOUT_ENV = "VERL_OPD_PLACEMENT_TIMEOUT_S"
DEFAULT_PLACEMENT_TIMEOUT_S = 60.0


class ResourceError(OPDConfigError):
    """A resource request Ray could not satisfy (it would wait forever); names the keys to change."""


def apply_cpu_defaults(config: DictConfig, overrides: Sequence[str] | None) -> list[str]:
    """Set :data:`CPU_DEFAULTS` for the keys ``overrides`` (the command line) does not set; log them.

    ``overrides=None`` means the command line is unknown (a config built in Python): the
    config's values are then taken as meant and nothing changes.
    """
    if overrides is None:
        return []
    from verl_opd.checks.overrides import given_keys

    given = given_keys(overrides)
    changes = []
    with open_dict(config):
        for key, value in CPU_DEFAULTS.items():
            if key not in given:
                OmegaConf.update(config, key, value)
                changes.append(f"{key}={value}")
    if changes:
        logger.warning(
            "verl-opd: trainer.device=cpu defaults applied: %s (not on the command line; set them to change)",
            ", ".join(changes),
        )
    return changes


def resource_pools(config: DictConfig) -> dict[str, list[int]]:
    """GPUs per node of each placement group verl will ask for, by pool (trainer/ppo/v1/trainer_base.py:816-848)."""
    trainer = config.trainer
    pools = {"trainer": [int(trainer.n_gpus_per_node)] * int(trainer.nnodes)}
    reward_model = OmegaConf.select(config, "reward.reward_model")
    if reward_model is not None and reward_model.get("enable_resource_pool", False):
        pools["reward.reward_model"] = [int(reward_model.n_gpus_per_node)] * int(reward_model.nnodes)
    distillation = OmegaConf.select(config, "distillation")
    if distillation is not None and distillation.get("enabled", False):
        pools["distillation"] = [int(distillation.n_gpus_per_node)] * int(distillation.nnodes)
    return pools


def _total_gpus(pools: dict[str, list[int]]) -> int:
    return sum(sum(nodes) for nodes in pools.values())


def required_cpu_ray(config: DictConfig) -> tuple[int, int]:
    """``(logical GPUs, logical CPUs)`` a local CPU run's Ray needs for verl's placement groups and actors."""
    gpus = _total_gpus(resource_pools(config))
    return gpus, CPUS_PER_BUNDLE * gpus + SPARE_CPUS


def _pool_keys(pools: dict[str, list[int]]) -> str:
    return " / ".join(f"{name}.n_gpus_per_node / {name}.nnodes" for name in pools)


def ray_address(config: DictConfig) -> str | None:
    """The Ray cluster the run joins (``ray_kwargs.ray_init.address`` or ``RAY_ADDRESS``); None: a local Ray."""
    address = OmegaConf.select(config, "ray_kwargs.ray_init.address") or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address  # "local": Ray's name for starting a new local instance


def _local_cpus() -> float:
    """CPUs a local Ray would advertise when ray_init.num_cpus is unset (Ray's own count, cgroup-aware)."""
    from ray._private.utils import get_num_cpus

    return get_num_cpus()


def visible_devices() -> tuple[int, str]:
    """Accelerators a GPU run's workers would use on this machine, and Ray's name for them.

    verl's platform decides (CUDA, NPU, ROCm). A process already switched to verl-opd's CPU
    platform (the doctor, after checking a CPU config) counts CUDA devices, as verl would detect.
    """
    from verl.plugin.platform import get_platform

    platform = get_platform()
    if platform.device_name == "cpu":
        import torch

        return torch.cuda.device_count(), "GPU"
    return int(platform.device_count()), platform.ray_resource_name()


def check_resources(config: DictConfig) -> None:
    """Refuse (:class:`ResourceError`) a request that Ray cannot satisfy, before Ray starts.

    Checked where it can be seen, i.e. for a local Ray (no ``ray_kwargs.ray_init.address``
    and no ``RAY_ADDRESS``): CPU runs need one node and enough logical GPUs/CPUs; GPU runs
    need one node with every GPU verl's pools ask for and 3 CPUs per GPU.
    """
    pools = resource_pools(config)
    bad = [name for name, nodes in pools.items() if not nodes or min(nodes) < 1]
    if bad:
        raise ResourceError(f"{_pool_keys({b: pools[b] for b in bad})} must be >= 1; got {pools}.")
    gpus = _total_gpus(pools)
    address = ray_address(config)
    nodes = max(len(n) for n in pools.values())
    if config.trainer.device == "cpu":
        if nodes > 1:
            raise ResourceError(
                f"trainer.device=cpu runs on one machine (a local Ray node), but {_pool_keys(pools)} ask for {nodes} "
                "nodes: set trainer.nnodes=1 (trainer.n_gpus_per_node=N gives N CPU workers)."
            )
        if address:
            raise ResourceError(
                f"trainer.device=cpu starts its own local Ray with logical GPUs, but Ray address {address!r} is set "
                "(ray_kwargs.ray_init.address or RAY_ADDRESS): unset both for a CPU run."
            )
        ray_init = config.ray_kwargs.ray_init
        need_gpus, need_cpus = required_cpu_ray(config)
        have_gpus, have_cpus = ray_init.get("num_gpus"), ray_init.get("num_cpus")
        if have_gpus is not None and have_gpus < need_gpus:
            raise ResourceError(
                f"ray_kwargs.ray_init.num_gpus={have_gpus} logical GPUs, but {_pool_keys(pools)} ask for {need_gpus}: "
                f"set ray_kwargs.ray_init.num_gpus={need_gpus} (or leave it unset) or lower trainer.n_gpus_per_node."
            )
        if have_cpus is not None and have_cpus < need_cpus:
            raise ResourceError(
                f"ray_kwargs.ray_init.num_cpus={have_cpus} logical CPUs, but {need_gpus} worker bundle(s) of "
                f"{CPUS_PER_BUNDLE} CPUs plus verl's other actors need {need_cpus}: set "
                f"ray_kwargs.ray_init.num_cpus={need_cpus} (or leave it unset) or lower trainer.n_gpus_per_node."
            )
        return
    if address:
        return  # an existing cluster: seen only once Ray runs (the placement timeout covers it)
    if nodes > 1:
        raise ResourceError(
            f"{_pool_keys(pools)} ask for {nodes} nodes, but no Ray cluster is given, so Ray starts one local node "
            "and would wait forever: set trainer.nnodes=1, or start a Ray cluster and pass "
            "ray_kwargs.ray_init.address=<head:port> (or RAY_ADDRESS); on a machine without GPUs add "
            "trainer.device=cpu."
        )
    visible, kind = visible_devices()
    if visible < gpus:
        fix = f"set trainer.n_gpus_per_node={visible}" if visible else "run on a machine with GPUs"
        raise ResourceError(
            f"{_pool_keys(pools)} ask for {gpus} {kind}(s) in all ({pools}) but this machine shows {visible}, so "
            f"Ray would wait forever: {fix} (lowering the pools' n_gpus_per_node to fit), or add trainer.device=cpu "
            "to run on CPU."
        )
    cpus = config.ray_kwargs.ray_init.get("num_cpus") or _local_cpus()
    need = CPUS_PER_BUNDLE * gpus
    if cpus < need:
        raise ResourceError(
            f"verl asks {CPUS_PER_BUNDLE} CPUs per GPU ({need} for {gpus} GPUs) but Ray has {cpus:g}: set "
            f"ray_kwargs.ray_init.num_cpus={need} (logical CPUs) or lower trainer.n_gpus_per_node."
        )


def placement_timeout_s() -> float | None:
    """Seconds to wait for one placement group (``VERL_OPD_PLACEMENT_TIMEOUT_S``, default 60); None = forever."""
    raw = os.environ.get(PLACEMENT_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_PLACEMENT_TIMEOUT_S
    seconds = float(raw)
    return seconds if seconds > 0 else None
