"""The OPD trainer: verl's synchronous PPO trainer with the teacher's reverse KL as advantage.

Registered as ``trainer.v1.trainer_mode=opd`` (set automatically by
``algorithm.adv_estimator=opd``). It differs from verl's ``sync`` trainer in three
places, plus one latency setting:

1. the actor/rollout/ref worker is :class:`~verl_opd.teacher_worker.OPDWorker`,
   which loads the teacher into the reference slot;
2. :meth:`OPDTrainer._compute_advantage` computes the OPD advantage from the
   student's and the teacher's log-probs of the sampled tokens, and logs ``opd/*``;
3. checkpoints record which teacher they were distilled from;
4. its replay buffer looks for finished rollouts every ``opd.sampler_poll_s`` (verl: every 2 s).

Student log-prob: the training engine's recomputed ``old_log_probs``, not the
rollout engine's. It is the same numerics that PPO's ratio uses at the update,
so the advantage and the loss see one student; the rollout's log-probs are only
compared with it (``opd/rollout_vs_train_log_prob_abs_diff_*``).
"""

from __future__ import annotations

import logging
import os

import ray
import transfer_queue as tq
from omegaconf import DictConfig, open_dict
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from verl_opd.advantage import compute_opd_advantage, opd_token_rewards
from verl_opd.checkpoint_identity import write_teacher_identity
from verl_opd.metrics import opd_metrics
from verl_opd.opd_config import TRAINER_MODE, OPDConfig
from verl_opd.teacher_worker import OPDWorker

logger = logging.getLogger(__name__)

_FIELDS = ["uid", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs", "ref_log_prob"]


@register_trainer(TRAINER_MODE)
class OPDTrainer(PPOTrainerSync):
    """verl's ``sync`` trainer, distilling from the teacher in the reference slot."""

    def __init__(self, config: DictConfig):
        self.opd = OPDConfig.from_config(config)
        # verl's base class switches on async behaviour for any mode other than "sync".
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        for role in (Role.ActorRolloutRef, Role.RefPolicy):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(OPDWorker)
        if Role.ActorRolloutRef not in self.role_worker_mapping and Role.RefPolicy not in self.role_worker_mapping:
            raise RuntimeError("verl built no reference worker, so OPD has no teacher; is use_kl_in_reward off?")

    def _build_replay_buffer(self):  # noqa: ANN202 - verl's ReplayBuffer or a user's custom sampler
        """verl's replay buffer, looking for a finished batch every ``opd.sampler_poll_s`` instead of 2 s.

        verl's sync buffer sleeps a fixed 2 s between looks, so generation that takes 0.3 s still costs a
        step 2 s; the look itself is one metadata read from the transfer queue, cheap at a few per second.
        """
        buffer = super()._build_replay_buffer()
        if hasattr(buffer, "poll_interval"):
            buffer.poll_interval = self.opd.sampler_poll_s
        return buffer

    def _compute_advantage(self, batch, metrics: dict):  # noqa: ANN001 - verl's KVBatchMeta
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=_FIELDS)
        nested_mask = data["response_mask"]
        tensors = DataProto(batch=data.to_padded_tensor()).batch
        mask = tensors["response_mask"]
        student, teacher = tensors["old_log_probs"], tensors["ref_log_prob"]
        task_rewards = tensors["rm_scores"] if self.opd.task_reward_coef else None

        advantages, returns = compute_opd_advantage(
            student,
            teacher,
            mask,
            kl_coef=self.opd.kl_coef,
            discount=self.opd.discount,
            task_rewards=task_rewards,
            task_reward_coef=self.opd.task_reward_coef,
        )
        rewards = opd_token_rewards(student, teacher, mask, self.opd.kl_coef, task_rewards, self.opd.task_reward_coef)
        metrics.update(opd_metrics(student, teacher, mask, advantages, tensors.get("rollout_log_probs", None)))

        output = {
            "advantages": advantages,
            "returns": returns,
            "token_level_rewards": rewards,
        }
        nested = TensorDict(
            {name: response_to_nested(value, nested_mask) for name, value in output.items()}, batch_size=len(batch)
        )
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=nested)

    def _save_checkpoint(self) -> None:
        step_dir = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        write_teacher_identity(step_dir, self.opd)
        super()._save_checkpoint()
