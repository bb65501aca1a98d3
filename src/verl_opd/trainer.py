"""The OPD trainer: verl's synchronous PPO trainer with the teacher's reverse KL as advantage.

Registered as ``trainer.v1.trainer_mode=opd`` (set automatically by
``algorithm.adv_estimator=opd``). It differs from verl's ``sync`` trainer in three
places, plus one latency setting:

1. the actor/rollout/ref worker is :class:`~verl_opd.teacher_worker.OPDWorker`,
   which loads the teacher into the reference slot;
2. :meth:`OPDTrainer._compute_advantage` computes the per-token KL reward from the
   student's and the teacher's log-probs of the sampled tokens and hands it, with the
   task reward and verl's ``uid`` groups, to the ``opd`` estimator it looks up in
   verl's registry (``get_adv_estimator_fn``); it logs ``opd/*``;
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

import numpy as np
import ray
import transfer_queue as tq
from omegaconf import DictConfig, open_dict
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from verl_opd.advantage import opd_token_rewards
from verl_opd.checkpoint_identity import write_teacher_identity
from verl_opd.metrics import eos_metrics, opd_metrics
from verl_opd.opd_config import TRAINER_MODE, OPDConfig
from verl_opd.teacher_worker import OPDWorker

logger = logging.getLogger(__name__)

_FIELDS = ["uid", "responses", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs", "ref_log_prob"]


@register_trainer(TRAINER_MODE)
class OPDTrainer(PPOTrainerSync):
    """verl's ``sync`` trainer, distilling from the teacher in the reference slot."""

    def __init__(self, config: DictConfig):
        # The driver's copy under actor_rollout_ref (apply_opd_settings): validated, teacher path absolute.
        # The top-level node may hold a path relative to the driver's directory, not this process's.
        self.opd = OPDConfig.from_config(config.actor_rollout_ref)
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
        """Per-token KL reward -> verl's registered ``opd`` estimator -> advantages, as verl does for its own.

        verl's base method (``verl/trainer/ppo/v1/trainer_base.py``, ``_compute_advantage``) applies the
        in-reward KL penalty and calls ``compute_advantage``, which passes no log-probs and no extra keywords
        to an estimator; OPD needs both, so this override computes ``r_t`` here and calls the estimator
        itself, looked up by name in verl's registry.
        """
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=_FIELDS)
        nested_mask = data["response_mask"]
        tensors = DataProto(batch=data.to_padded_tensor()).batch
        uids = np.array(tensors.pop("uid").tolist(), dtype=object)
        mask = tensors["response_mask"]
        student, teacher = tensors["old_log_probs"], tensors["ref_log_prob"]

        kl_rewards = opd_token_rewards(student, teacher, mask, self.opd.kl_coef)
        # verl's reward loop puts the sequence's score on its last token; the sum is R wherever it sits.
        scores = tensors["rm_scores"].to(kl_rewards.dtype)
        estimator = core_algos.get_adv_estimator_fn(self.config.algorithm.adv_estimator)
        advantages, returns = estimator(
            token_level_rewards=kl_rewards,
            response_mask=mask,
            config=self.config.algorithm,
            index=uids,
            discount=self.opd.discount,
            sequence_rewards=scores.sum(dim=-1),
            task_reward_coef=self.opd.task_reward_coef,
        )
        metrics.update(opd_metrics(student, teacher, mask, advantages, tensors.get("rollout_log_probs", None)))
        metrics.update(eos_metrics(tensors["responses"], mask, self._eos_token_ids()))

        output = {
            "advantages": advantages,
            "returns": returns,
            # What verl logs as critic/rewards: per sequence, -kl_coef * sum_t d_t + task_reward_coef * R.
            "token_level_rewards": kl_rewards + self.opd.task_reward_coef * scores,
        }
        nested = TensorDict(
            {name: response_to_nested(value, nested_mask) for name, value in output.items()}, batch_size=len(batch)
        )
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=nested)

    def _eos_token_ids(self) -> list[int]:
        """The ids that end a response: the tokenizer's EOS (verl's trainer holds the student's tokenizer)."""
        eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def _save_checkpoint(self) -> None:
        step_dir = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        write_teacher_identity(step_dir, self.opd)
        super()._save_checkpoint()
