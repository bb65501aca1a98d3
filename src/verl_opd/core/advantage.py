"""On-policy distillation (OPD) advantage: pure tensor math, torch only.

For each sampled response token t (see ``shared/design/opd-spec.md``)::

    d_t = log pi_S(y_t | ...) - log pi_T(y_t | ...)      per-token reverse-KL sample (k1)
    r_t = -kl_coef * d_t
    A_t = sum_{k >= t} discount^(k - t) * r_k            over response tokens only
          + task_reward_coef * (R - b)                   on EVERY response token (not discounted)

R is the sequence's task reward and b the mean R of its group of samples of the same
prompt (GRPO's baseline without std division), 0 for a group of one. A sequence
reward put on the last token only would, at discount 0, train that one token.

Sign convention (spec rule 1): A_t > 0 where the teacher assigns the sampled token a
higher log-prob than the student, so the policy-gradient step pushes the student
towards the teacher. Teacher == student gives A_t == 0 exactly.

Everything here is a plain function of ``(batch, response_length)`` tensors laid out
the way verl lays out its response tensors (``old_log_probs``, ``ref_log_prob``,
``token_level_scores``, ``response_mask``). Nothing here imports verl, so the math
can be tested on any machine and reused by any trainer.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

__all__ = [
    "opd_token_rewards",
    "discounted_reward_to_go",
    "group_baselined_rewards",
    "task_advantage",
    "advantage_from_rewards",
    "compute_opd_advantage",
]


def _check_same_2d(**tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every given tensor is 2-D and all shapes agree.

    A silent broadcast between, say, a ``(B, T)`` log-prob tensor and a ``(B, 1)`` or
    ``(B, T + 1)`` one would misalign tokens (spec rule 3) without any error, so the
    shapes are checked strictly rather than left to torch broadcasting.
    """
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D (batch, response_length), got {t.dim()}-D with shape {tuple(t.shape)}. "
                "Pass per-token values for the response part only, one row per sequence."
            )
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(
            f"shape mismatch: {listed}. All of them must be (batch, response_length) and aligned token by "
            "token with response_mask: slice log-probs to the response tokens (the log-prob of token t comes "
            "from position t-1 of the full prompt+response sequence) before calling."
        )


def _check_discount(discount: float) -> float:
    """Return ``discount`` as a float, or raise ``ValueError`` unless ``0 <= discount <= 1``."""
    try:
        value = float(discount)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(discount, bool) or not (0.0 <= value <= 1.0):
        raise ValueError(
            f"discount must be a number in [0, 1], got {discount!r}. Use 0.0 for per-token OPD "
            "(the default and the Thinking Machines setting) or a value like 0.9 to credit future tokens."
        )
    return value


def _check_coef(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite, non-negative number.

    A negative ``kl_coef`` would flip the sign of the distillation signal and push the
    student away from the teacher (spec rule 1); a negative task-reward coefficient
    would likewise reward failures. Neither is ever what a run wants.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}. Set it to a finite number >= 0 (default 1.0).")
    if v < 0:
        raise ValueError(
            f"{name} must be >= 0, got {value!r}: a negative coefficient flips the sign of its reward. "
            f"Use a non-negative {name}."
        )


def _float32_at_least(x: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 (keep float64), detached.

    Log-probs arrive in bf16/fp16 from some engines. Subtracting in bf16 rounds the
    per-token difference to steps of ~0.03-0.06 near typical log-prob magnitudes,
    which is often larger than the signal itself (spec rule 10), so the cast must
    happen *before* the subtraction.
    """
    x = x.detach()
    if x.dtype == torch.float64:
        return x
    return x.to(torch.float32)


def opd_token_rewards(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Per-token OPD reward ``r_t = -kl_coef * (log pi_S - log pi_T)``.

    Args:
        student_log_probs: ``(B, T)`` log-prob of each sampled token under the student
            (the distribution the student sampled from).
        teacher_log_probs: ``(B, T)`` log-prob of the same tokens under the teacher.
        response_mask: ``(B, T)``, nonzero on sampled response tokens (the sampled EOS
            included), zero on padding and on tokens the student did not generate.
        kl_coef: weight of the reverse-KL reward. Must be finite and >= 0. A ``(B,)`` tensor
            gives each sequence its own (several teachers: each sample its teacher's ``kl_coef``).

    Returns:
        ``(B, T)`` float32 rewards, exactly 0 where ``response_mask`` is 0 (also where
        the log-probs there are garbage such as ``-inf``/NaN), detached.

    Sign: the reward is positive where the teacher likes the token more than the student.
    """
    _check_same_2d(
        student_log_probs=student_log_probs,
        teacher_log_probs=teacher_log_probs,
        response_mask=response_mask,
    )
    mask = response_mask.detach().bool()
    # Upcast first, then subtract (spec rule 10).
    diff = _float32_at_least(student_log_probs) - _float32_at_least(teacher_log_probs)
    if isinstance(kl_coef, torch.Tensor):
        if kl_coef.shape != diff.shape[:1]:
            raise ValueError(f"kl_coef per sequence must have shape ({diff.shape[0]},), got {tuple(kl_coef.shape)}.")
        for value in kl_coef.tolist():
            _check_coef("kl_coef", value)
        coef = kl_coef.to(device=diff.device, dtype=diff.dtype).unsqueeze(1)
    else:
        _check_coef("kl_coef", kl_coef)
        coef = float(kl_coef)
    # Sign convention: d_t > 0 where the student is more confident than the teacher, so
    # r_t = -kl_coef * d_t > 0 where the teacher likes the token more than the student.
    rewards = -coef * diff
    # torch.where rather than a multiply: 0 * inf / 0 * nan at padded positions would leak NaN.
    rewards = torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    return rewards.to(torch.float32)


def discounted_reward_to_go(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    discount: float,
) -> torch.Tensor:
    """Discounted return-to-go ``A_t = sum_{k >= t} discount^(k - t) r_k`` over response tokens.

    Only positions where ``response_mask`` is nonzero take part: a masked position (right
    padding, or a tool-output hole in the middle of a multi-turn response) neither
    contributes its reward nor counts in the exponent, so the discount acts on the
    student's own tokens only. The result is 0 outside the mask.

    ``discount == 0`` is the per-token OPD default and returns ``rewards`` masked (no
    loop). ``discount == 1`` sums every later response token's reward; note that verl's
    ``algorithm.gamma`` defaults to 1.0, which is why this never reads it (spec rule 11).

    Args:
        rewards: ``(B, T)`` per-token rewards.
        response_mask: ``(B, T)``, nonzero on response tokens.
        discount: in ``[0, 1]``.

    Returns:
        ``(B, T)`` float32 (float64 stays float64), detached.
    """
    _check_same_2d(rewards=rewards, response_mask=response_mask)
    discount = _check_discount(discount)

    mask = response_mask.detach().bool()
    rewards = _float32_at_least(rewards)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    masked_rewards = torch.where(mask, rewards, zero)
    if discount == 0:
        return masked_rewards

    # Backward scan over time, vectorised over the batch. At a masked position the
    # running sum passes through unchanged, so holes are skipped, not discounted.
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    out = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], masked_rewards[:, t] + discount * running, running)
        out[:, t] = running
    return torch.where(mask, out, zero)


def group_baselined_rewards(sequence_rewards: torch.Tensor, index: Sequence[Hashable] | None = None) -> torch.Tensor:
    """``R_i - b_i``: each sequence reward minus the mean reward of its group.

    A group is the set of sequences sampled for one prompt (verl's ``uid``). The baseline
    is the group mean, as in GRPO, but without the std division: the task reward keeps
    its own scale, so ``task_reward_coef`` weighs it against the KL reward in the units
    the user chose (spec rule 2 applies to the KL part; the task part is centred only).
    A group of one has baseline 0 (its own mean would cancel its reward), and so does
    every sequence when ``index`` is None.

    Args:
        sequence_rewards: ``(B,)`` task reward of each sequence.
        index: ``B`` group ids (any hashables, e.g. verl's uid strings), or None.

    Returns:
        ``(B,)`` float32 (float64 stays float64), detached.
    """
    rewards = _float32_at_least(sequence_rewards)
    if rewards.dim() != 1:
        raise ValueError(f"sequence_rewards must be 1-D (batch,), got shape {tuple(rewards.shape)}.")
    if index is None:
        return rewards
    ids = list(index)
    if len(ids) != rewards.shape[0]:
        raise ValueError(f"index has {len(ids)} entries for {rewards.shape[0]} sequence rewards; give one per row.")
    groups: dict[Hashable, list[int]] = {}
    for row, group in enumerate(ids):
        groups.setdefault(group, []).append(row)
    baseline = torch.zeros_like(rewards)
    for rows in groups.values():
        if len(rows) > 1:
            baseline[rows] = rewards[rows].mean()
    return rewards - baseline


def task_advantage(
    sequence_rewards: torch.Tensor | None,
    response_mask: torch.Tensor,
    task_reward_coef: float,
    index: Sequence[Hashable] | None = None,
) -> torch.Tensor | None:
    """``task_reward_coef * (R - b)`` on every response token, 0 elsewhere; None when the coefficient is 0.

    Raises ``ValueError`` for a negative/non-finite coefficient, or a nonzero one without rewards.
    """
    _check_coef("task_reward_coef", task_reward_coef)
    if float(task_reward_coef) == 0:
        return None
    if sequence_rewards is None:
        raise ValueError(
            f"task_reward_coef={task_reward_coef!r} but no sequence rewards were given. Pass each sequence's "
            "task reward R (for verl: rm_scores summed over the response) or set task_reward_coef=0."
        )
    _check_same_2d(response_mask=response_mask)
    if tuple(sequence_rewards.shape) != (response_mask.shape[0],):
        raise ValueError(
            f"sequence_rewards must have shape (batch,) = ({response_mask.shape[0]},), got "
            f"{tuple(sequence_rewards.shape)}: one task reward per sequence, not per token."
        )
    centred = group_baselined_rewards(sequence_rewards, index).to(torch.float32)
    per_token = float(task_reward_coef) * centred.unsqueeze(-1).expand(response_mask.shape)
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return torch.where(response_mask.detach().bool(), per_token, zero)


def advantage_from_rewards(
    kl_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    discount: float = 0.0,
    sequence_rewards: torch.Tensor | None = None,
    task_reward_coef: float = 0.0,
    index: Sequence[Hashable] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_t = sum_{k >= t} discount^(k - t) * r_k + task_reward_coef * (R - b)`` from the KL rewards ``r_t``.

    This is the body of verl's registered ``opd`` estimator (:mod:`verl_opd.glue.estimator`);
    :func:`compute_opd_advantage` is the same from log-probs. Returns ``(advantages,
    returns)``, equal, float32, 0 outside the mask.
    """
    advantages = discounted_reward_to_go(kl_rewards, response_mask, discount)
    return with_task_advantage(advantages, response_mask, sequence_rewards, task_reward_coef, index)


def with_task_advantage(
    kl_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    sequence_rewards: torch.Tensor | None,
    task_reward_coef: float,
    index: Sequence[Hashable] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, A)`` with ``A = kl_advantages + task_reward_coef * (R - b)`` (:func:`task_advantage`): the last
    step of every OPD advantage, per token or per chunk (OPD has no critic: returns equal advantages)."""
    task = task_advantage(sequence_rewards, response_mask, task_reward_coef, index)
    advantages = kl_advantages if task is None else kl_advantages + task
    return advantages, advantages


def compute_opd_advantage(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float = 1.0,
    discount: float = 0.0,
    sequence_rewards: torch.Tensor | None = None,
    task_reward_coef: float = 0.0,
    index: Sequence[Hashable] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OPD advantages and returns for verl's policy loss.

    ``A_t = sum_{k >= t} discount^(k - t) * r_k + task_reward_coef * (R - b)``, with ``r_t``
    from :func:`opd_token_rewards` and ``R - b`` from :func:`group_baselined_rewards`,
    on every response token. The task part is not discounted: it is a per-sequence
    signal, credited to every token the student sampled (spec, "The method").

    There is deliberately no normalisation of the KL reward (no group mean, no std
    division; spec rule 2): it is already on a meaningful per-token scale, and whitening
    it would turn "the student is close to the teacher everywhere" into large spurious
    signals. The advantage is a constant for the update: it is detached, so no gradient
    flows into either model through it.

    Args:
        student_log_probs: ``(B, T)`` student log-probs of the sampled tokens.
        teacher_log_probs: ``(B, T)`` teacher log-probs of the same tokens.
        response_mask: ``(B, T)``, nonzero on sampled response tokens (EOS included).
        kl_coef: weight of the reverse-KL reward, finite and >= 0.
        discount: in ``[0, 1]``; 0 (default) gives the per-token advantage ``A_t = r_t``.
        sequence_rewards: optional ``(B,)`` task reward R of each sequence.
        task_reward_coef: weight of the task reward, finite and >= 0.
        index: optional ``B`` group ids (verl's uid); the task baseline is the group mean.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` float32 and equal (OPD has no critic),
        0 outside the mask.

    Raises:
        ValueError: on non-2-D inputs, mismatched shapes, ``discount`` outside ``[0, 1]``,
            a non-finite or negative coefficient, or ``task_reward_coef != 0`` without
            ``sequence_rewards``.
    """
    _check_discount(discount)
    rewards = opd_token_rewards(student_log_probs, teacher_log_probs, response_mask, kl_coef=kl_coef)
    return advantage_from_rewards(rewards, response_mask, discount, sequence_rewards, task_reward_coef, index)
