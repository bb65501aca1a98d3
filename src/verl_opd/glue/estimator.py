"""Register ``algorithm.adv_estimator=opd`` with verl's advantage-estimator registry.

The registry is the call path: :class:`verl_opd.glue.trainer.OPDTrainer` looks the
estimator up with ``core_algos.get_adv_estimator_fn("opd")`` and calls it, as verl's
own ``compute_advantage`` (``verl/trainer/ppo/ray_trainer.py``) calls every estimator
other than ``gae``/``grpo``::

    fn(token_level_rewards=..., response_mask=..., config=<algorithm config>, index=<uid array>, ...)

``token_level_rewards`` is the per-token OPD KL reward ``r_t = -kl_coef * (log pi_S -
log pi_T)`` (:func:`verl_opd.core.advantage.opd_token_rewards`); verl passes no log-probs to
an estimator, so the trainer computes ``r_t`` first. The OPD trainer adds three
keywords that verl's ``compute_advantage`` never passes: ``discount``,
``sequence_rewards`` (the task reward R per sequence) and ``task_reward_coef``. Called
by verl's ``compute_advantage`` without them, the estimator is per-token OPD with no
task reward.

It never reads ``config.gamma``: verl's ``algorithm.gamma`` defaults to 1.0, which would
silently sum every later token's KL into each advantage (spec rule 11).

verl is imported lazily and only from ``verl.trainer.ppo.core_algos``, which does not
resolve a device platform at import time (the v1 trainer and engine modules do).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from verl_opd.core.advantage import advantage_from_rewards
from verl_opd.core.xtok import advantage_from_chunk_rewards

__all__ = ["ESTIMATOR_NAME", "compute_opd_estimator", "register"]

ESTIMATOR_NAME = "opd"


def compute_opd_estimator(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Sequence[Hashable] | None = None,
    discount: float = 0.0,
    sequence_rewards: torch.Tensor | None = None,
    task_reward_coef: float = 0.0,
    chunk_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator for OPD.

    ``A_t = sum_{k >= t} discount^(k - t) * r_k + task_reward_coef * (R - b)`` on every
    response token, ``b`` the mean R of the sequence's ``index`` group (its prompt's
    samples; 0 for a group of one).

    Args:
        token_level_rewards: ``(B, T)`` per-token OPD KL reward r_t (positive where the
            teacher likes the token more than the student).
        response_mask: ``(B, T)``, nonzero on sampled response tokens.
        config: verl's algorithm config. Deliberately unused: its ``gamma`` defaults to 1.0.
        index: verl's uid per row; groups the samples of one prompt for the task baseline.
        discount: KL reward-to-go discount in ``[0, 1]`` (0: per-token OPD).
        sequence_rewards: ``(B,)`` task reward per sequence, or None.
        task_reward_coef: weight of the task reward (0: pure OPD).
        chunk_ids: ``(B, T)`` chunk index per token for a teacher with its own view
            (``opd.teacher.view=own``), -1 on masked chunks and padding; ``token_level_rewards`` then
            holds the chunk rewards ``r_c`` on each chunk's last token, the discount counts chunks and
            every token of a chunk gets its return
            (:func:`~verl_opd.core.xtok.advantage_from_chunk_rewards`). None: one token per chunk.
        **kwargs: what else verl passes (``reward_baselines``...), unused: OPD has no
            other baseline and no normalisation (spec rule 2).

    Returns:
        ``(advantages, returns)``, equal, float32, 0 outside the mask, detached.
    """
    del config, kwargs  # never config.gamma (spec rule 11)
    if chunk_ids is not None:
        return advantage_from_chunk_rewards(
            token_level_rewards, chunk_ids, response_mask, discount, sequence_rewards, task_reward_coef, index
        )
    return advantage_from_rewards(
        token_level_rewards, response_mask, discount, sequence_rewards, task_reward_coef, index
    )


# Marks the function as ours so re-registration after a module reload is recognised.
compute_opd_estimator.__verl_opd_estimator__ = True  # type: ignore[attr-defined]


def register() -> None:
    """Register :func:`compute_opd_estimator` under the name ``"opd"``. Idempotent.

    verl's ``register_adv_est`` raises ``ValueError`` when a name is registered again
    with a *different* function object (same object is a no-op). A reload of this module
    creates a new function object, so an existing entry that is ours (marked with
    ``__verl_opd_estimator__``) is kept as is. An ``"opd"`` entry from anyone else is a
    real conflict and raises.
    """
    from verl.trainer.ppo import core_algos

    existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME)
    if existing is not None:
        if existing is compute_opd_estimator or getattr(existing, "__verl_opd_estimator__", False):
            return
        raise ValueError(
            f"verl already has an advantage estimator named {ESTIMATOR_NAME!r} ({existing!r}) that is not "
            "verl-opd's. Remove the other registration or uninstall the package that provides it."
        )
    core_algos.register_adv_est(ESTIMATOR_NAME)(compute_opd_estimator)
