"""The OPD trainer: verl's synchronous PPO trainer with the teacher's reverse KL as advantage.

Registered as ``trainer.v1.trainer_mode=opd`` (set automatically by
``algorithm.adv_estimator=opd``). It differs from verl's ``sync`` trainer in three
places, plus one latency setting:

1. the actor/rollout/ref worker is :class:`~verl_opd.glue.teacher_worker.OPDWorker`,
   which loads the teacher into the reference slot, for a LoRA student too (verl would
   otherwise score a LoRA student's reference with its own adapter-free weights);
2. :meth:`OPDTrainer._compute_advantage` computes the per-token KL reward from the
   student's and the teacher's log-probs of the sampled tokens and hands it, with the
   task reward and verl's ``uid`` groups, to the ``opd`` estimator it looks up in
   verl's registry (``get_adv_estimator_fn``); it logs ``opd/*``;
3. checkpoints record which teacher they were distilled from;
4. its replay buffer looks for finished rollouts every ``opd.sampler_poll_s`` (verl: every 2 s).

Student log-prob: the training engine's, not the rollout engine's. It is the same
numerics that PPO's ratio uses at the update, so the advantage and the loss see one
student; the rollout's log-probs are only compared with it
(``opd/rollout_vs_train_log_prob_abs_diff_*``). Which forward gives it depends on
``opd.recompute`` (resolved in the driver, :func:`~verl_opd.config.opd_config.resolve_recompute`):

* ``always``: verl's ``old_log_prob`` recompute, a forward of its own before the update;
* ``never`` (where each step is one on-policy update, so that recompute equals the update's
  forward): the update's own forward. The recompute is skipped, ``old_log_probs`` holds the
  rollout's log-probs, the ``opd/*`` metrics of the advantage step are computed from those, and
  the ``opd_onpolicy`` policy loss (:mod:`verl_opd.glue.policy_loss`) turns the advantage into the
  exact one and measures the rollout-vs-train gap (its token mean only: verl averages a loss's
  metrics over micro-batches, so no max). verl's ``actor/entropy`` and
  ``training/rollout_probs_diff_*`` came from the recompute and are not logged.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig, open_dict
from tensordict import TensorDict
from verl.protocol import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.trainer.ppo.utils import Role, need_reference_policy
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from verl_opd.checks.checkpoint_identity import teacher_identity, write_teacher_identity
from verl_opd.config.opd_config import TRAINER_MODE, OPDConfig
from verl_opd.core.advantage import opd_token_rewards
from verl_opd.core.metrics import eos_metrics, opd_metrics, per_teacher_metrics
from verl_opd.core.xtok import KEPT, chunk_rewards, shaping_metrics, token_chunk_metrics
from verl_opd.glue.own_view import XTOK_FIELDS
from verl_opd.glue.policy_loss import pop_gap_metric
from verl_opd.glue.teacher_worker import TEACHER_FORWARD_S_FIELD, TEACHER_INDEX_FIELD, OPDWorker

logger = logging.getLogger(__name__)

_FIELDS = ["uid", "responses", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs", "ref_log_prob"]


@register_trainer(TRAINER_MODE)
class OPDTrainer(PPOTrainerSync):
    """verl's ``sync`` trainer, distilling from the teacher in the reference slot."""

    def __init__(self, config: DictConfig):
        # The driver's copy under actor_rollout_ref (apply_opd_settings): validated, teacher path absolute.
        # The top-level node may hold a path relative to the driver's directory, not this process's.
        self.opd = OPDConfig.from_config(config.actor_rollout_ref)
        self._skip_recompute = self.opd.recompute == "never"
        # What each checkpoint records: fingerprinted once, as the teacher the run loads.
        self._teacher_identity = teacher_identity(self.opd)
        # verl's base class switches on async behaviour for any mode other than "sync".
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    @property
    def ref_in_actor(self) -> bool:
        """Always ``False``: OPD's reference slot holds the teacher, never the student's adapter-free base.

        verl sets ``self.ref_in_actor`` for a LoRA student (``model.lora_rank``/``lora.rank`` > 0 or
        ``lora_adapter_path``, verl/trainer/ppo/v1/trainer_base.py:234-237) and then scores the reference
        log-probs with the actor's own weights, adapter disabled (:1703-1709): the teacher would be the
        student's base model. The worker role is promoted in :meth:`_init_resource_pool_mgr`, so the ref
        slot has a worker of its own; this makes every read of the flag take that worker's path.
        """
        return False

    @ref_in_actor.setter
    def ref_in_actor(self, _verl_value: bool) -> None:
        """verl's own assignment (``_setup``) is discarded: see the getter."""

    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        if Role.ActorRollout in self.role_worker_mapping and need_reference_policy(self.config):
            # A LoRA student: verl maps it to actor+rollout only, counting on ref-in-actor
            # (trainer_base.py:796-804). OPD needs the ref slot built, with the teacher in it.
            self.role_worker_mapping[Role.ActorRolloutRef] = self.role_worker_mapping.pop(Role.ActorRollout)
            self.mapping[Role.ActorRolloutRef] = self.mapping.pop(Role.ActorRollout)
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
        """Read the step's tensors from verl's TransferQueue, run :func:`opd_advantage_step`, write back."""
        fields = _FIELDS + (list(XTOK_FIELDS) if self.opd.teacher.view == "own" else [])
        if self.opd.teachers:
            fields += [TEACHER_INDEX_FIELD, TEACHER_FORWARD_S_FIELD]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        nested_mask = data["response_mask"]
        proto = DataProto(batch=data.to_padded_tensor())
        uids = np.array(proto.batch.pop("uid").tolist(), dtype=object)
        output, step_metrics = opd_advantage_step(
            proto, uids, self.opd, self.config.algorithm, self._eos_token_ids(), student_is_rollout=self._skip_recompute
        )
        metrics.update(step_metrics)
        nested = TensorDict(
            {name: response_to_nested(value, nested_mask) for name, value in output.items()}, batch_size=len(batch)
        )
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=nested)

    def _compute_old_log_prob(self, batch, metrics: dict):  # noqa: ANN001, ANN202 - verl's KVBatchMeta
        """verl's recompute, or (recompute skipped) the rollout's log-probs in the ``old_log_probs`` slot.

        verl's update reads ``old_log_probs`` (verl/workers/utils/losses.py:86); in the skipped mode the
        ``opd_onpolicy`` loss corrects the advantage from them to the update's own log-probs, so they must
        be finite on every sampled token.
        """
        if not self._skip_recompute:
            return super()._compute_old_log_prob(batch, metrics)
        fields = ["rollout_log_probs", "response_mask"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        if "rollout_log_probs" not in data.keys():
            raise RuntimeError(
                "opd.recompute skips verl's old_log_prob recompute and starts from the rollout's log-probs, but "
                "this rollout returned none (rollout_log_probs). Set opd.recompute=always."
            )
        padded = data.to_padded_tensor()
        rollout = padded["rollout_log_probs"]
        if not torch.isfinite(rollout[padded["response_mask"].bool()]).all():
            raise RuntimeError(
                "The rollout reported a non-finite log-prob for a sampled token; with the recompute skipped the "
                "advantage starts from those. Set opd.recompute=always (the trainer's recompute instead)."
            )
        data["old_log_probs"] = data.pop("rollout_log_probs")
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=data.select("old_log_probs"))

    def _update_actor(self, batch, metrics: dict):  # noqa: ANN001, ANN202 - verl's KVBatchMeta
        """verl's update; the ``opd_onpolicy`` loss's rollout-vs-train gap logged as ``opd/...``."""
        batch = super()._update_actor(batch, metrics)
        pop_gap_metric(metrics)
        return batch

    def _eos_token_ids(self) -> list[int]:
        """The ids that end a response: the tokenizer's EOS (verl's trainer holds the student's tokenizer)."""
        eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def _save_checkpoint(self) -> None:
        step_dir = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        write_teacher_identity(step_dir, self._teacher_identity)
        super()._save_checkpoint()


def opd_advantage_step(
    proto: DataProto,
    uids: np.ndarray,
    opd: OPDConfig,
    algorithm: DictConfig,
    eos_token_ids: list[int],
    student_is_rollout: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One step's OPD advantage, in the order of verl's own advantage step, with the KL reward in place of its.

    verl's base method (``verl/trainer/ppo/v1/trainer_base.py``, ``_compute_advantage``): (1) in-reward KL
    penalty, (2) rollout correction, (3) ``compute_advantage``, which passes no log-probs and no extra
    keywords to an estimator. OPD keeps (2) as verl does it and replaces (1) and (3):

    1. rollout correction (``algorithm.rollout_correction``), verl's own function, as verl applies it:
       importance weights ``rollout_is_weights`` for the policy loss and rejection sampling folded into
       ``response_mask``, both written back for the update. Rejected tokens get advantage 0.
    2. the per-token KL reward ``r_t`` from the student's ``old_log_probs`` (verl's recompute, or the
       rollout's where it is skipped: the ``opd_onpolicy`` loss then corrects it) and the teacher's
       ``ref_log_prob``;
    3. verl's registered ``opd`` estimator, looked up by name (``get_adv_estimator_fn``), with verl's
       ``uid`` groups and the task reward.

    The ``opd/*`` metrics describe every sampled token (the mask before rejection): rejected tokens are
    the ones where the rollout and the trainer disagree most, and the gap metric must see them.

    Args:
        proto: padded tensors ``responses``, ``response_mask``, ``rm_scores``, ``old_log_probs``,
            ``ref_log_prob`` and (when the rollout reported them) ``rollout_log_probs``.
        uids: verl's uid per row (the prompt's samples share one).
        opd: the run's OPD settings.
        algorithm: verl's ``algorithm`` config node.
        eos_token_ids: ids that end a response, for the EOS metrics.
        student_is_rollout: ``old_log_probs`` are the rollout's (recompute skipped): no rollout correction
            (the driver keeps the recompute when one is set) and no gap metric here (the loss logs it).

    Returns:
        ``(fields to write back, metrics)``.
    """
    tensors = proto.batch
    sampled_mask = tensors["response_mask"]
    student, teacher = tensors["old_log_probs"], tensors["ref_log_prob"]
    rollout = tensors.get("rollout_log_probs", None)
    output: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}

    if student_is_rollout:
        rollout = None
    correction = algorithm.get("rollout_correction", None)
    if correction is not None and rollout is not None:
        # bypass_mode is refused in the driver (opd_config), so old_log_probs is a real recompute here.
        proto, correction_metrics = compute_rollout_correction_and_add_to_batch(proto, correction)
        metrics.update(correction_metrics)
        output["response_mask"] = proto.batch["response_mask"]
        if "rollout_is_weights" in proto.batch:
            output["rollout_is_weights"] = proto.batch["rollout_is_weights"]
    mask = proto.batch["response_mask"]

    # verl's reward loop puts the sequence's score on its last token; the sum is R wherever it sits.
    scores = tensors["rm_scores"].to(torch.float32)
    estimator = core_algos.get_adv_estimator_fn(algorithm.adv_estimator)
    chunk_kw: dict[str, torch.Tensor] = {}
    if "xtok_chunk" in tensors.keys():
        # opd.teacher.view=own: the teacher scored its own tokenisation; rewards per chunk (core/xtok.py).
        chunk_ids = _kept_chunk_ids(tensors["xtok_chunk"], tensors["xtok_reason"], sampled_mask, mask)
        kl_rewards = chunk_rewards(student, tensors["xtok_teacher_lp"], chunk_ids, mask, opd.kl_coef)
        chunk_kw["chunk_ids"] = chunk_ids
        metrics.update(
            token_chunk_metrics(
                tensors["xtok_chunk"],
                tensors["xtok_reason"],
                tensors["xtok_teacher_n"],
                tensors["xtok_noncanonical"],
                sampled_mask,
            )
        )
        metrics.update(shaping_metrics(tensors["xtok_shift"], tensors["xtok_teacher_n"], sampled_mask))
    elif TEACHER_INDEX_FIELD in tensors.keys():
        # Several teachers: each sequence's KL weighted by its own teacher's kl_coef.
        teacher_index = tensors[TEACHER_INDEX_FIELD].reshape(-1).long()
        kl_coefs = torch.tensor(opd.teacher_kl_coefs(), dtype=torch.float32)[teacher_index]
        kl_rewards = opd_token_rewards(student, teacher, mask, kl_coefs)
    else:
        kl_rewards = opd_token_rewards(student, teacher, mask, opd.kl_coef)
    advantages, returns = estimator(
        token_level_rewards=kl_rewards,
        response_mask=mask,
        config=algorithm,
        index=uids,
        discount=opd.discount,
        sequence_rewards=scores.sum(dim=-1),
        task_reward_coef=opd.task_reward_coef,
        **chunk_kw,
    )
    # The metrics' advantages are those of the sampled tokens (rejected ones read 0 there).
    metrics.update(opd_metrics(student, teacher, sampled_mask, advantages, rollout))
    if TEACHER_INDEX_FIELD in tensors.keys():
        names = [name for name, _, _ in opd.teacher_list()]
        forward_s = tensors[TEACHER_FORWARD_S_FIELD].reshape(-1)
        metrics.update(per_teacher_metrics(student, teacher, sampled_mask, advantages, teacher_index, names, forward_s))
    metrics.update(eos_metrics(tensors["responses"], sampled_mask, eos_token_ids))
    output.update(
        advantages=advantages,
        returns=returns,
        # What verl logs as critic/rewards: per sequence, -kl_coef * sum_t d_t + task_reward_coef * R.
        token_level_rewards=kl_rewards + opd.task_reward_coef * scores,
    )
    return output, metrics


def _kept_chunk_ids(
    chunk: torch.Tensor, reason: torch.Tensor, sampled_mask: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Chunk index per token for the advantage: -1 on padding, masked chunks and chunks rollout rejection touched.

    Rejection sampling (``algorithm.rollout_correction.rollout_rs``) folds into ``response_mask``; a chunk
    with a rejected token loses its whole KL signal rather than being credited through a hole.
    """
    ids = chunk.long().clamp(min=0)
    rejected = (sampled_mask.bool() & ~mask.bool()).long()
    touched = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long).scatter_add_(1, ids, rejected)
    keep = mask.bool() & (reason.long() == KEPT) & (touched.gather(1, ids) == 0)
    return torch.where(keep, ids, torch.full_like(ids, -1))
