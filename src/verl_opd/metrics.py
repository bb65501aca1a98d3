"""OPD training metrics: pure tensor math, torch only.

Keys follow verl's ``section/name`` style so they sit next to verl's own metrics in
any tracker. All statistics are over sampled response tokens only (``response_mask``
nonzero); values at masked positions may be garbage (``-inf``, NaN) and never leak.
"""

from __future__ import annotations

import torch

__all__ = ["opd_metrics"]


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-D float64 tensor of ``x`` at the masked positions (float64: exact sums for logging)."""
    return x.detach()[mask].to(torch.float64)


def _min_gap(values: torch.Tensor) -> float:
    distinct = torch.unique(values)
    return (distinct[1:] - distinct[:-1]).min().item() if distinct.numel() > 1 else 0.0


def opd_metrics(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    rollout_log_probs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Scalar OPD metrics for one batch.

    Args:
        student_log_probs: ``(B, T)`` student log-probs used for the reward (verl's
            recomputed ``old_log_probs`` in the OPD trainer).
        teacher_log_probs: ``(B, T)`` teacher log-probs of the same tokens.
        response_mask: ``(B, T)``, nonzero on sampled response tokens.
        advantages: ``(B, T)`` advantages as fed to the policy loss.
        rollout_log_probs: optional ``(B, T)`` log-probs reported by the rollout engine
            for the same tokens. Their gap to ``student_log_probs`` measures how far the
            sampler and the trainer disagree about the same policy (spec rule 6): a
            large gap means the reward is computed for a slightly different policy than
            the one that sampled.

    Returns:
        ``opd/reverse_kl``: mean over response tokens of ``student - teacher`` (k1 sample
        of the reverse KL per token; the quantity OPD drives to 0).
        ``opd/reverse_kl_per_seq``: mean over sequences of the per-sequence sum of that
        difference (sequences with no response token are left out).
        ``opd/teacher_log_prob``, ``opd/student_log_prob``: token means.
        ``opd/advantage_{mean,std,min,max}``: over response tokens (std is the
        population std, 0 for a single token).
        ``opd/teacher_prefers_frac``: fraction of response tokens where the teacher
        log-prob is strictly higher than the student's (where A_t > 0 at discount 0).
        ``opd/response_tokens``: number of response tokens.
        ``opd/advantage_min_gap``: smallest gap between two distinct advantage values, a
        precision probe (spec rule 10): bf16 log-probs put every advantage on a grid of
        about 0.03, so a gap well below 1e-3 shows the advantages are not quantised
        (0.0 when fewer than two distinct values exist).
        With ``rollout_log_probs``: ``opd/rollout_vs_train_log_prob_abs_diff_{mean,max}``
        of ``|rollout - student|``.
        An all-zero mask gives 0.0 for every value rather than NaN.
    """
    tensors = {
        "student_log_probs": student_log_probs,
        "teacher_log_probs": teacher_log_probs,
        "response_mask": response_mask,
        "advantages": advantages,
    }
    if rollout_log_probs is not None:
        tensors["rollout_log_probs"] = rollout_log_probs
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"opd_metrics: shape mismatch {shapes}; all must be (batch, response_length).")

    mask = response_mask.detach().bool()
    n_tokens = int(mask.sum().item())

    keys = [
        "opd/reverse_kl",
        "opd/reverse_kl_per_seq",
        "opd/teacher_log_prob",
        "opd/student_log_prob",
        "opd/advantage_mean",
        "opd/advantage_std",
        "opd/advantage_min",
        "opd/advantage_max",
        "opd/teacher_prefers_frac",
        "opd/advantage_min_gap",
    ]
    if rollout_log_probs is not None:
        keys += ["opd/rollout_vs_train_log_prob_abs_diff_mean", "opd/rollout_vs_train_log_prob_abs_diff_max"]
    if n_tokens == 0:
        out = dict.fromkeys(keys, 0.0)
        out["opd/response_tokens"] = 0.0
        return out

    student = _masked_values(student_log_probs, mask)
    teacher = _masked_values(teacher_log_probs, mask)
    adv = _masked_values(advantages, mask)
    diff = student - teacher

    # Per-sequence sums: zero the masked positions with where (not a multiply) so -inf/NaN
    # padding cannot leak, then average over the sequences that have response tokens.
    full_diff = student_log_probs.detach().to(torch.float64) - teacher_log_probs.detach().to(torch.float64)
    full_diff = torch.where(mask, full_diff, torch.zeros((), dtype=torch.float64, device=full_diff.device))
    has_tokens = mask.any(dim=-1)
    per_seq = full_diff.sum(dim=-1)[has_tokens]

    out = {
        "opd/reverse_kl": diff.mean().item(),
        "opd/reverse_kl_per_seq": per_seq.mean().item(),
        "opd/teacher_log_prob": teacher.mean().item(),
        "opd/student_log_prob": student.mean().item(),
        "opd/advantage_mean": adv.mean().item(),
        "opd/advantage_std": adv.std(correction=0).item(),
        "opd/advantage_min": adv.min().item(),
        "opd/advantage_max": adv.max().item(),
        "opd/teacher_prefers_frac": (teacher > student).to(torch.float64).mean().item(),
        "opd/advantage_min_gap": _min_gap(adv),
    }
    if rollout_log_probs is not None:
        gap = (_masked_values(rollout_log_probs, mask) - student).abs()
        out["opd/rollout_vs_train_log_prob_abs_diff_mean"] = gap.mean().item()
        out["opd/rollout_vs_train_log_prob_abs_diff_max"] = gap.max().item()
    out["opd/response_tokens"] = float(n_tokens)
    return out
