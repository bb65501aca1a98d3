"""``policy_loss.loss_mode=opd_onpolicy``: the OPD update without verl's ``old_log_prob`` recompute.

Where each step is a single on-policy update (``opd.recompute`` resolved to ``never``, see
:func:`verl_opd.config.opd_config.resolve_recompute`), verl's recompute of the student's log-probs is
the same forward as the update's own, so :class:`~verl_opd.glue.trainer.OPDTrainer` skips it. In its
place verl's ``old_log_probs`` slot carries the rollout engine's log-probs ``l_roll`` (what verl's own
bypass mode puts there, verl/trainer/ppo/v1/trainer_base.py:1642-1646), and the driver computes the
advantages from them::

    A_roll_t = sum_{k>=t} discount^(k-t) * (-kl_coef) * (l_roll_k - l_teacher_k) + task_reward_coef * (R - b)

verl hands a policy loss only ``old_log_prob``, ``log_prob``, ``advantages`` and ``response_mask``
(verl/workers/utils/losses.py:84-112), never the teacher's log-prob. The KL reward is linear in the
student's log-prob, so the loss recovers the exact advantage from the update's own log-prob ``l``
(detached)::

    A_t = A_roll_t - kl_coef * sum_{k>=t} discount^(k-t) * (l_k - l_roll_k)

and takes the on-policy gradient ``-A_t * grad l_t`` (loss ``-A * exp(l - l.detach())``, aggregated by
verl's ``agg_loss``): verl's ``vanilla`` PPO clip at ratio 1, which is what the recompute path computes
(there ``old_log_probs == l``, and the clip terms are inactive). The reward-to-go is over whole
sequences: verl's micro-batches hold whole sequences, padded to ``(B, T)`` before the loss
(``no_padding_2_padding``, verl/workers/utils/losses.py:59).

The loss also measures ``|l - l_roll|`` on the sampled tokens, the rollout-vs-trainer gap that the
recompute path logs (spec rule 6), as a sum and a count per micro-batch: verl averages every policy-loss
metric over micro-batches, and the ratio of the two averages is the exact token mean.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from verl_opd.config.opd_config import ONPOLICY_LOSS
from verl_opd.core.advantage import discounted_reward_to_go, opd_token_rewards

__all__ = ["GAP_MEAN_KEY", "opd_onpolicy_loss", "pop_gap_metric", "register"]

GAP_MEAN_KEY = "opd/rollout_vs_train_log_prob_abs_diff_mean"
# What verl logs the loss's metrics as: its update prefixes every key with "actor/" (trainer_base.py:1861).
_GAP_SUM_KEY = "opd/rollout_vs_train_abs_diff_sum"
_GAP_COUNT_KEY = "opd/rollout_vs_train_tokens"


def opd_onpolicy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    *,
    kl_coef: float,
    discount: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl policy loss (``register_policy_loss`` signature): OPD's policy gradient with ``A`` from ``log_prob``.

    Args:
        old_log_prob: ``(B, T)`` the log-probs the ``advantages`` were computed from (the rollout's).
        log_prob: ``(B, T)`` the update's own log-probs of the sampled tokens, with gradient.
        advantages: ``(B, T)`` OPD advantages computed from ``old_log_prob`` as the student's.
        response_mask: ``(B, T)``, nonzero on sampled response tokens.
        loss_agg_mode: verl's aggregation (``actor.loss_agg_mode``).
        config: verl's ``ActorConfig``; its ``global_batch_info`` makes the aggregation independent of
            the micro-batch size (spec rule 7).
        rollout_is_weights: must be None: importance weights are computed from recomputed old log-probs,
            and the driver keeps the recompute when they are configured.
        kl_coef: ``opd.kl_coef``.
        discount: ``opd.discount``.

    Returns:
        ``(loss, metrics)``; the metrics are the gap ``|log_prob - old_log_prob|`` summed over the sampled
        tokens and their count (:func:`pop_gap_metric` turns them into the token mean).
    """
    if rollout_is_weights is not None:
        raise ValueError(
            f"policy_loss.loss_mode={ONPOLICY_LOSS} got rollout importance weights, which are computed from a "
            "recomputed old_log_probs that this mode skips. Set opd.recompute=auto (keeps the recompute when "
            "algorithm.rollout_correction.rollout_is is set)."
        )
    mask = response_mask.bool()
    # -kl_coef * RTG(l - l_roll): the part of the advantage that the driver computed from the rollout's log-probs.
    correction = discounted_reward_to_go(opd_token_rewards(log_prob, old_log_prob, mask, kl_coef), mask, discount)
    exact_advantages = advantages + correction
    ratio = torch.exp(log_prob - log_prob.detach())  # 1, with the gradient of log_prob
    loss = agg_loss(
        loss_mat=-exact_advantages * ratio,
        loss_mask=mask,
        loss_agg_mode=loss_agg_mode,
        **config.global_batch_info,
    )
    gap = (log_prob.detach().to(torch.float64) - old_log_prob.to(torch.float64)).abs()
    gap_sum = torch.where(mask, gap, torch.zeros((), dtype=gap.dtype, device=gap.device)).sum()
    return loss, {_GAP_SUM_KEY: gap_sum.item(), _GAP_COUNT_KEY: float(mask.sum().item())}


def pop_gap_metric(metrics: dict[str, float]) -> None:
    """Replace the loss's gap sum and count (as verl logged them, under ``actor/``) by their token mean."""
    gap_sum = metrics.pop(f"actor/{_GAP_SUM_KEY}", None)
    count = metrics.pop(f"actor/{_GAP_COUNT_KEY}", None)
    if gap_sum is not None and count:
        metrics[GAP_MEAN_KEY] = float(gap_sum) / float(count)


def register(kl_coef: float, discount: float) -> None:
    """Register :func:`opd_onpolicy_loss` with this run's ``kl_coef`` and ``discount`` under ``opd_onpolicy``.

    Called in the student's worker process (:class:`~verl_opd.glue.teacher_worker.OPDWorker`), where verl
    looks the loss up by name at every micro-batch; verl passes a policy loss no OPD settings.
    """
    register_policy_loss(ONPOLICY_LOSS)(functools.partial(opd_onpolicy_loss, kl_coef=kl_coef, discount=discount))
