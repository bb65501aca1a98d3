"""Register ``algorithm.adv_estimator=opd`` with verl's advantage-estimator registry.

verl calls a registered estimator (for every name other than ``gae``/``grpo``) from
``verl.trainer.ppo.ray_trainer.compute_advantage`` as::

    fn(token_level_rewards=..., response_mask=..., config=<algorithm config>,
       [index=uid array], [reward_baselines=...])

The ``opd`` estimator treats ``token_level_rewards`` as the per-token OPD reward r_t.
That is what :func:`verl_opd.advantage.opd_token_rewards` produces, and also what
verl's own in-reward KL path produces when the teacher sits in the reference slot
(``algorithm.use_kl_in_reward=True``, ``kl_penalty=kl``: ``scores - beta * (old_log_probs
- ref_log_prob)``). It returns the discounted reward-to-go of those rewards.

The discount is ``kwargs["discount"]`` (default 0.0, per-token OPD). verl never passes
that keyword, so through verl's own trainer the estimator is always per-token. It
never reads ``config.gamma``: verl's ``algorithm.gamma`` defaults to 1.0, which would
silently sum every later token's KL into each advantage (spec rule 11). The OPD
trainer applies ``opd.discount`` itself by calling
:func:`verl_opd.advantage.compute_opd_advantage` / :func:`discounted_reward_to_go`.

verl is imported lazily and only from ``verl.trainer.ppo.core_algos``, which does not
resolve a device platform at import time (the v1 trainer and engine modules do).
"""

from __future__ import annotations

from typing import Any

import torch

from verl_opd.advantage import discounted_reward_to_go

__all__ = ["ESTIMATOR_NAME", "compute_opd_estimator", "register"]

ESTIMATOR_NAME = "opd"


def compute_opd_estimator(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator for OPD: discounted reward-to-go of the per-token OPD reward.

    Args:
        token_level_rewards: ``(B, T)`` per-token OPD reward r_t (positive where the
            teacher likes the token more than the student).
        response_mask: ``(B, T)``, nonzero on sampled response tokens.
        config: verl's algorithm config. Deliberately unused: its ``gamma`` defaults to 1.0.
        **kwargs: ``discount`` (default 0.0) is read; verl's ``index`` / ``reward_baselines``
            are ignored (OPD uses no group baseline and no normalisation, spec rule 2).

    Returns:
        ``(advantages, returns)``, equal, float32, 0 outside the mask, detached.
    """
    del config  # never config.gamma (spec rule 11)
    discount = kwargs.get("discount", 0.0)
    advantages = discounted_reward_to_go(token_level_rewards, response_mask, discount)
    return advantages, advantages


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
