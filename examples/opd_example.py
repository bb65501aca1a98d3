"""verl-opd from Python: compose the config, apply the OPD settings, launch verl's own trainer.

This does in Python what ``python -m verl.trainer.main_ppo --config-name=opd_trainer ...`` does:

1. compose verl's Hydra config (``opd_trainer`` = verl's ``ppo_trainer`` + the ``opd`` node);
2. run verl-opd's driver hook (:func:`verl_opd.glue.driver.configure`): checks the teacher and the
   tokenizers before any model loads, and sets the verl keys OPD needs (logged);
3. run verl's ``validate_config`` exactly as ``main_ppo`` does;
4. launch ``run_ppo(config, task_runner_class=TaskRunnerV1)`` (Ray, workers, training loop).

Tiny CPU run (build the assets first, e.g. with ``bash examples/run_tiny_opd_cpu.sh`` or ``verl-opd tiny``)::

    python examples/opd_example.py --cpu --student /tmp/verl-opd-tiny/student \
        --teacher /tmp/verl-opd-tiny/teacher --data-dir /tmp/verl-opd-tiny/data --steps 3

GPU run (vLLM rollout, FSDP; see run_qwen3-8b_opd.sh for the full recipe)::

    python examples/opd_example.py --student ~/models/Qwen3-8B-Base --teacher ~/models/Qwen3-8B \
        --data-dir ~/data/gsm8k trainer.n_gpus_per_node=8

``--dry-run`` prints the composed, OPD-configured config and exits without starting Ray.
Any further arguments are Hydra overrides and win over the ones built here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

CONFIG_MODULE = "verl.trainer.config"  # where verl's ppo_trainer.yaml lives; verl-opd adds opd_trainer.yaml


def build_overrides(args: argparse.Namespace) -> list[str]:
    """Hydra overrides for the chosen models, data and device; user overrides come last and win."""
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    overrides = [
        f"opd.teacher.model_path={os.path.abspath(os.path.expanduser(args.teacher))}",
        f"actor_rollout_ref.model.path={os.path.abspath(os.path.expanduser(args.student))}",
        f"data.train_files={os.path.join(data_dir, 'train.parquet')}",
        f"data.val_files={os.path.join(data_dir, 'test.parquet')}",
        "opd.kl_coef=1.0",
        "opd.discount=0.0",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
    ]
    if args.cpu:
        # The tiny CPU setup: verl-opd's CPU platform and 'hf' rollout, one logical GPU.
        steps = args.steps or 3
        overrides += [
            "trainer.device=cpu",
            "data.train_batch_size=4",
            "data.max_prompt_length=64",
            "data.max_response_length=16",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.actor.optim.lr=1e-3",
            "actor_rollout_ref.rollout.n=1",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "trainer.n_gpus_per_node=1",
            "trainer.val_before_train=False",
            "trainer.test_freq=-1",
            "trainer.logger=console",
        ]
    else:
        # GPUs: the Thinking Machines shape (64 prompts x 4 samples, lr 1e-6), vLLM rollout, FSDP2.
        steps = args.steps or 150
        overrides += [
            "data.train_batch_size=64",
            "data.max_prompt_length=1024",
            "data.max_response_length=4096",
            "actor_rollout_ref.actor.strategy=fsdp2",
            "actor_rollout_ref.ref.strategy=fsdp2",
            "actor_rollout_ref.actor.ppo_mini_batch_size=64",
            "actor_rollout_ref.actor.use_dynamic_bsz=True",
            "actor_rollout_ref.actor.optim.lr=1e-6",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
            "actor_rollout_ref.rollout.gpu_memory_utilization=0.5",
            "trainer.n_gpus_per_node=8",
            "trainer.logger=console",
        ]
    overrides += [
        "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        "trainer.project_name=verl-opd-example",
        f"trainer.experiment_name={'cpu' if args.cpu else 'gpu'}",
    ]
    return overrides + list(args.overrides)


def compose_config(overrides: Sequence[str], config_name: str = "opd_trainer"):
    """verl's config composed with Hydra's compose API, as ``main_ppo`` composes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def prepare(config) -> None:
    """What ``main_ppo.main`` does between composing and launching, with verl-opd's hook made explicit."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils import device
    from verl.utils.config import validate_config

    from verl_opd.glue.driver import configure

    # verl-opd's driver hook: OPD checks and settings (+ the CPU settings for trainer.device=cpu).
    # main_ppo runs it inside verl's auto_set_device, which the plugin wraps; here it is called
    # directly, followed by verl's own (unwrapped) device detection.
    configure(config)
    getattr(device.auto_set_device, "__wrapped__", device.auto_set_device)(config)
    validate_config(
        config=config,
        use_reference_policy=need_reference_policy(config),
        use_critic=need_critic(config),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, help="student model directory (actor_rollout_ref.model.path)")
    parser.add_argument("--teacher", required=True, help="teacher model directory (opd.teacher.model_path)")
    parser.add_argument("--data-dir", default="~/data/gsm8k", help="directory with train.parquet and test.parquet")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (tiny models) instead of GPUs")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 3 on CPU, 150 on GPUs)")
    parser.add_argument("--dry-run", action="store_true", help="print the composed OPD config; do not launch")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (they win)")
    args = parser.parse_intermixed_args(argv)

    config = compose_config(build_overrides(args))
    prepare(config)

    if args.dry_run:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(config))
        print(
            f"# dry run: algorithm.adv_estimator={config.algorithm.adv_estimator}, "
            f"opd.teacher.model_path={config.opd.teacher.model_path}, "
            f"actor_rollout_ref.rollout.name={config.actor_rollout_ref.rollout.name}; not launched"
        )
        return 0

    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

    run_ppo(config, task_runner_class=TaskRunnerV1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
