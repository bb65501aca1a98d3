"""Issue 3 end to end: verl's real ``main_ppo`` runs GRPO on CPU with ``trainer.device=cpu`` alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REWARD = Path(__file__).parent / "assets" / "digit_fraction_reward.py"
CHECKSUM = re.compile(r"verl-opd hf rollout: weights for step (\S+) loaded \(\d+ tensors, checksum (\S+)\)")


def test_grpo_trains_on_cpu(tiny, cpu_args, main_ppo, tmp_path):
    args = cpu_args(tiny, steps=2) + [
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "trainer.save_freq=-1",
        f"reward.custom_reward_function.path={REWARD}",
        "reward.custom_reward_function.name=compute_score",
    ]
    run = main_ppo(args, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2], run.tail()

    for step, metrics in run.steps.items():
        # rewards vary between samples, so GRPO has a signal and the policy gradient is non-zero
        assert metrics["critic/score/max"] > metrics["critic/score/min"], step
        assert metrics["actor/grad_norm"] > 0, step
        # the hf rollout samples from the same policy the training engine recomputes
        assert metrics["rollout_corr/log_ppl_abs_diff"] < 1e-3, step
        assert metrics["training/rollout_probs_diff_max"] < 1e-3, step

    # the trained weights reach the rollout server after every step
    syncs = CHECKSUM.findall(run.output)
    checksums = [float(value) for _, value in syncs]
    assert len(checksums) >= 3, run.tail()
    assert checksums[1] != checksums[0] and checksums[2] != checksums[1]
