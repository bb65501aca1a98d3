"""OPD training metrics: pure tensor math, torch only.

Keys follow verl's ``section/name`` style so they sit next to verl's own metrics in
any tracker. All statistics are over sampled response tokens only (``response_mask``
nonzero); values at masked positions may be garbage (``-inf``, NaN) and never leak.
"""

from __future__ import annotations

import torch

__all__ = ["LOW_PRECISION_MIN_ABS", "eos_metrics", "low_precision_grid_fraction", "opd_metrics", "per_teacher_metrics"]

# Only log-probs at least this far from 0 take part in the precision probe (see low_precision_grid_fraction).
LOW_PRECISION_MIN_ABS = 0.5


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-D float64 tensor of ``x`` at the masked positions (float64: exact sums for logging)."""
    return x.detach()[mask].to(torch.float64)


def low_precision_grid_fraction(log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the masked log-probs with ``|x| >= 0.5`` that lie exactly on the bf16 or fp16 grid.

    A precision probe (spec rule 10). A log-prob that was computed, or stored on its way,
    in bf16/fp16 and then upcast is exactly representable in that format, so the fraction
    is 1.0. An fp32 log-prob ``z_y - logsumexp(z)`` is a multiple of ``ulp(|z|)`` (about
    2^-18 for logits of magnitude 16-32), which has about 18 significant bits at ``|x| >= 0.5``:
    it lands on the bf16 grid (8 bits) with probability about 2^-10 and on the fp16 grid
    (11 bits) with about 2^-7, so the fraction stays near 0.01 or below. Log-probs closer to
    0 are left out on purpose: for a confident token, fp32 cancellation leaves only a few
    significant bits (``-2^-20`` is common), which would sit on the bf16 grid in fp32 too.

    What it does NOT see: logits computed in bf16 and log-softmaxed in fp32 (the fp32
    result of a bf16 matmul is not on any grid, yet carries the bf16 rounding of the
    logits). That mode is a choice of the training engine's precision settings, not
    something the log-prob values can reveal. Returns 0.0 when no value qualifies.
    """
    values = log_probs.detach()[mask].to(torch.float32)
    values = values[values.abs() >= LOW_PRECISION_MIN_ABS]
    if values.numel() == 0:
        return 0.0
    on_bf16 = values.to(torch.bfloat16).to(torch.float32) == values
    on_fp16 = values.to(torch.float16).to(torch.float32) == values
    return (on_bf16 | on_fp16).to(torch.float64).mean().item()


def eos_metrics(responses: torch.Tensor, response_mask: torch.Tensor, eos_token_ids: list[int]) -> dict[str, float]:
    """Where the sampled EOS sits relative to the mask (spec rule 4), as ``opd/*`` metrics.

    ``opd/eos_terminated_frac``: fraction of sequences whose last masked token is an EOS
    id (the sampled EOS is trained on; the rest hit the length limit).
    ``opd/response_tokens_after_eos``: masked tokens after a sequence's first EOS, summed.
    In a single-turn run it is 0: a mask that let padding in would count it, also when
    the pad id is the EOS id (a multi-turn response counts its later turns here).
    """
    mask = response_mask.detach().bool()
    is_eos = torch.zeros_like(mask)
    for eos in eos_token_ids:
        is_eos |= responses == eos
    has_tokens = mask.any(dim=-1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=-1).values.clamp(min=0)
    ended_with_eos = is_eos.gather(1, last.unsqueeze(1)).squeeze(1) & has_tokens
    eos_in_mask = is_eos & mask
    first_eos = torch.where(eos_in_mask, positions, torch.full_like(positions, mask.shape[1])).min(dim=-1).values
    after = mask & (positions > first_eos.unsqueeze(1))
    n_seqs = max(int(has_tokens.sum().item()), 1)
    return {
        "opd/eos_terminated_frac": ended_with_eos.sum().item() / n_seqs,
        "opd/response_tokens_after_eos": float(after.sum().item()),
    }


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
        ``opd/{student,teacher}_log_prob_lowp_frac``: the precision probe
        :func:`low_precision_grid_fraction` of each side's log-probs (about 1.0: the
        log-probs went through bf16/fp16; near 0: fp32).
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
        "opd/student_log_prob_lowp_frac",
        "opd/teacher_log_prob_lowp_frac",
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
        "opd/student_log_prob_lowp_frac": low_precision_grid_fraction(student_log_probs, mask),
        "opd/teacher_log_prob_lowp_frac": low_precision_grid_fraction(teacher_log_probs, mask),
    }
    if rollout_log_probs is not None:
        gap = (_masked_values(rollout_log_probs, mask) - student).abs()
        out["opd/rollout_vs_train_log_prob_abs_diff_mean"] = gap.mean().item()
        out["opd/rollout_vs_train_log_prob_abs_diff_max"] = gap.max().item()
    out["opd/response_tokens"] = float(n_tokens)
    return out


# What each teacher of several logs, as opd/<name>/<key>: the global opd_metrics key it is read from.
_PER_TEACHER_KEYS = {
    "reverse_kl": "opd/reverse_kl",
    "reverse_kl_per_seq": "opd/reverse_kl_per_seq",
    "teacher_log_prob": "opd/teacher_log_prob",
    "advantage_mean": "opd/advantage_mean",
    "response_tokens": "opd/response_tokens",
}


def per_teacher_metrics(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    teacher_index: torch.Tensor,
    names: list[str],
    forward_s: torch.Tensor | None = None,
) -> dict[str, float]:
    """:func:`opd_metrics` of each teacher's own samples, as ``opd/<name>/...`` (several teachers, issue 13).

    ``teacher_index``: ``(B,)``, the position in ``names`` of the teacher that scored each sequence.
    Per teacher: ``opd/<name>/samples`` (its sequences this step), and, when it has any,
    ``reverse_kl``, ``reverse_kl_per_seq``, ``teacher_log_prob``, ``advantage_mean`` and ``response_tokens``
    over them. A teacher without samples this step logs only its count (a 0 KL would read as a perfect match).

    ``forward_s``: ``(B,)``, the wall time of the forward of each sequence's teacher on the rank that scored it;
    logged as ``opd/<name>/forward_s``, the max over its sequences, so over the ranks that held any of them: the
    slowest rank's, which the step waits for (the teacher's FSDP collectives keep the ranks in step; a rank that
    ran only padding rows reports nothing).
    """
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        rows = teacher_index == k
        n = int(rows.sum().item())
        out[f"opd/{name}/samples"] = float(n)
        if n == 0:
            continue
        own = opd_metrics(student_log_probs[rows], teacher_log_probs[rows], response_mask[rows], advantages[rows])
        out.update({f"opd/{name}/{key}": own[source] for key, source in _PER_TEACHER_KEYS.items()})
        if forward_s is not None:
            out[f"opd/{name}/forward_s"] = forward_s[rows].max().item()
    return out
