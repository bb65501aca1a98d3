"""Issue 14: the recompute-free OPD update (``opd_onpolicy`` loss) has the recompute path's gradient.

A tiny model, no Ray. The recompute path is verl's: ``old_log_probs`` from a separate forward of the
same weights, the OPD advantage from them, verl's ``vanilla`` policy loss over the whole batch. The
recompute-free path: advantages from the rollout's log-probs (the trainer's plus a gap, as a sampler
reports them), the ``opd_onpolicy`` loss over two micro-batches of verl's global-batch aggregation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig

from verl_opd.core.advantage import compute_opd_advantage
from verl_opd.glue.policy_loss import GAP_MEAN_KEY, opd_onpolicy_loss, pop_gap_metric

PROMPT, RESPONSE, BATCH = 5, 7, 4
KL_COEF = 0.7
ROLLOUT_GAP = 0.02  # std of the rollout's log-prob error against the trainer's
UIDS = np.array(["p0", "p0", "p1", "p1"], dtype=object)
SCORES = torch.tensor([1.0, 0.0, 0.25, 0.75])


def _response_log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(B, RESPONSE)`` log-probs of the response tokens; the token at t is scored from position t-1."""
    logits = model(input_ids=ids).logits[:, PROMPT - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, PROMPT:].unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def setup(tiny):
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(tiny.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny.teacher, dtype=torch.float32)
    ids = torch.randint(3, student.config.vocab_size, (BATCH, PROMPT + RESPONSE))
    lengths = torch.tensor([7, 5, 3, 6])  # right padding after each response
    mask = (torch.arange(RESPONSE).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int64)
    with torch.no_grad():
        teacher_lp = _response_log_probs(teacher, ids)
    return student, ids, mask, teacher_lp


def _config(mask: torch.Tensor, agg: str) -> ActorConfig:
    config = ActorConfig(
        strategy="fsdp", ppo_mini_batch_size=BATCH, ppo_micro_batch_size_per_gpu=2, rollout_n=1, loss_agg_mode=agg
    )
    # what verl's ppo_loss sets per micro-batch: the global batch's sizes (verl/workers/utils/losses.py:65-68)
    config.global_batch_info.update(
        dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=BATCH, loss_scale_factor=None
    )
    return config


def _advantages(student_lp, teacher_lp, mask, discount, task_coef) -> torch.Tensor:
    advantages, _ = compute_opd_advantage(student_lp, teacher_lp, mask, KL_COEF, discount, SCORES, task_coef, UIDS)
    return advantages


def _grad(model: torch.nn.Module) -> torch.Tensor:
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grad


def _recompute_path_grad(setup, discount, task_coef, agg, old_lp=None) -> torch.Tensor:
    """verl's path: recompute, advantage from it (or from ``old_lp``), vanilla PPO loss on the whole batch."""
    student, ids, mask, teacher_lp = setup
    with torch.no_grad():
        recomputed = _response_log_probs(student, ids)
    old = recomputed if old_lp is None else old_lp
    config = _config(mask, agg)
    loss, _ = get_policy_loss_fn("vanilla")(
        old_log_prob=recomputed,
        log_prob=_response_log_probs(student, ids),
        advantages=_advantages(old, teacher_lp, mask, discount, task_coef),
        response_mask=mask.bool(),
        loss_agg_mode=agg,
        config=config,
    )
    loss.backward()
    return _grad(student)


def _rollout_log_probs(setup) -> torch.Tensor:
    student, ids, _, _ = setup
    with torch.no_grad():
        trainer = _response_log_probs(student, ids)
    return trainer + ROLLOUT_GAP * torch.randn(trainer.shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(("discount", "task_coef"), [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5), (0.9, 0.5)])
def test_recompute_free_gradient_equals_the_recompute_path(setup, discount, task_coef, agg) -> None:
    student, ids, mask, teacher_lp = setup
    rollout = _rollout_log_probs(setup)
    config = _config(mask, agg)
    advantages = _advantages(rollout, teacher_lp, mask, discount, task_coef)  # what the driver computes
    gap_sum = gap_count = 0.0
    for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches of whole sequences, gradients accumulated
        loss, metrics = opd_onpolicy_loss(
            old_log_prob=rollout[rows],
            log_prob=_response_log_probs(student, ids[rows]),
            advantages=advantages[rows],
            response_mask=mask[rows].bool(),
            loss_agg_mode=agg,
            config=config,
            kl_coef=KL_COEF,
            discount=discount,
        )
        loss.backward()
        gap_sum += metrics["opd/rollout_vs_train_abs_diff_sum"]
        gap_count += metrics["opd/rollout_vs_train_tokens"]
    recompute_free = _grad(student)

    recompute = _recompute_path_grad(setup, discount, task_coef, agg)
    assert recompute.abs().max() > 1e-3  # a real gradient
    difference = (recompute_free - recompute).abs().max()
    print(f"max |grad difference| {difference:.2e}, max |grad| {recompute.abs().max():.2e}")
    assert difference <= 1e-6, difference
    # the test can tell: the rollout's log-probs as the student's, uncorrected, move the gradient far more than 1e-6
    uncorrected = _recompute_path_grad(setup, discount, task_coef, agg, old_lp=rollout)
    assert (uncorrected - recompute).abs().max() > 1e-4

    # the gap metric, as verl logs it (each micro-batch's value averaged) and the trainer reads it
    logged = {
        "actor/opd/rollout_vs_train_abs_diff_sum": gap_sum / 2,
        "actor/opd/rollout_vs_train_tokens": gap_count / 2,
    }
    pop_gap_metric(logged)
    with torch.no_grad():
        expected = (_response_log_probs(student, ids) - rollout).abs()[mask.bool()].double().mean().item()
    assert logged == {GAP_MEAN_KEY: pytest.approx(expected, rel=1e-6)}


def test_importance_weights_are_refused(setup) -> None:
    _, _, mask, teacher_lp = setup
    with pytest.raises(ValueError, match="opd.recompute=auto"):
        opd_onpolicy_loss(
            teacher_lp,
            teacher_lp,
            torch.zeros_like(teacher_lp),
            mask.bool(),
            config=_config(mask, "token-mean"),
            rollout_is_weights=torch.ones_like(teacher_lp),
            kl_coef=1.0,
            discount=0.0,
        )
