"""``OPDTrainer``'s advantage step without Ray: verl's rollout correction honoured, the registry on the call path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import verl  # noqa: F401  (loads the plugin: registers the opd estimator)
from omegaconf import OmegaConf
from verl.protocol import DataProto

from verl_opd.config.opd_config import OPDConfig
from verl_opd.core.advantage import compute_opd_advantage
from verl_opd.glue.trainer import opd_advantage_step

EOS = 2


def _proto(rollout_shift: torch.Tensor | None = None) -> DataProto:
    student = torch.tensor([[-1.0, -2.0, -0.5, -0.3], [-0.7, -1.5, -0.2, -9.0]])
    teacher = torch.tensor([[-0.5, -2.5, -0.5, -0.1], [-1.7, -1.0, -0.2, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    shift = rollout_shift if rollout_shift is not None else torch.zeros_like(student)
    scores = torch.zeros_like(student)
    scores[0, 3], scores[1, 2] = 1.0, 0.25
    return DataProto.from_dict(
        tensors={
            "responses": torch.tensor([[5, 6, 7, 8], [5, 6, EOS, EOS]]),
            "response_mask": mask,
            "rm_scores": scores,
            "old_log_probs": student,
            "ref_log_prob": teacher,
            "rollout_log_probs": student + shift,
        }
    )


def _algorithm(**correction: object) -> object:
    base = {"rollout_is": None, "rollout_is_threshold": 2.0, "rollout_rs": None, "rollout_rs_threshold": None}
    return OmegaConf.create({"adv_estimator": "opd", "gamma": 1.0, "rollout_correction": {**base, **correction}})


UIDS = np.array(["a", "b"], dtype=object)


def test_step_without_correction_is_the_opd_advantage_with_task_reward() -> None:
    proto = _proto()
    opd = OPDConfig(kl_coef=0.5, discount=0.0, task_reward_coef=2.0)
    output, metrics = opd_advantage_step(proto, UIDS, opd, _algorithm(), [EOS])
    b = proto.batch
    expected, _ = compute_opd_advantage(
        b["old_log_probs"], b["ref_log_prob"], b["response_mask"], 0.5, 0.0, torch.tensor([1.0, 0.25]), 2.0, UIDS
    )
    assert torch.equal(output["advantages"], expected)
    assert torch.equal(output["response_mask"], b["response_mask"])  # nothing rejected
    assert "rollout_is_weights" not in output
    assert metrics["opd/eos_terminated_frac"] == 0.5 and metrics["opd/response_tokens_after_eos"] == 0.0


def test_importance_weights_are_verls_and_go_back_to_the_batch() -> None:
    shift = torch.tensor([[0.0, 0.5, -1.5, 0.0], [0.2, 0.0, 0.0, 0.0]])  # rollout log-prob - trainer log-prob
    proto = _proto(shift)
    output, metrics = opd_advantage_step(proto, UIDS, OPDConfig(), _algorithm(rollout_is="token"), [EOS])
    # token-level truncated IS: w = min(pi_old / pi_rollout, threshold) on response tokens
    expected = torch.clamp(torch.exp(-shift), max=2.0) * proto.batch["response_mask"]
    torch.testing.assert_close(output["rollout_is_weights"], expected)
    assert any(key.startswith("rollout_corr/") for key in metrics)


def test_rejection_sampling_masks_tokens_and_zeroes_their_advantage() -> None:
    shift = torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # token (0, 1): ratio e^-3, outside bounds
    proto = _proto(shift)
    sampled = proto.batch["response_mask"].clone()
    output, metrics = opd_advantage_step(
        proto, UIDS, OPDConfig(), _algorithm(rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0"), [EOS]
    )
    kept = output["response_mask"]
    assert kept[0, 1] == 0 and int(kept.sum()) == int(sampled.sum()) - 1
    assert output["advantages"][0, 1] == 0.0
    assert output["advantages"][0, 0] == pytest.approx(0.5)  # -(-1.0 - -0.5): other tokens as before
    # the metrics see every sampled token, the rejected one included
    assert metrics["opd/response_tokens"] == float(sampled.sum())
    assert metrics["opd/rollout_vs_train_log_prob_abs_diff_max"] == pytest.approx(3.0)


def test_recompute_skipped_step_leaves_the_gap_and_the_correction_to_the_loss() -> None:
    """old_log_probs are the rollout's: no rollout-correction pass, no gap metric (0 by construction)."""
    proto = _proto()
    output, metrics = opd_advantage_step(proto, UIDS, OPDConfig(), _algorithm(), [EOS], student_is_rollout=True)
    b = proto.batch
    expected, _ = compute_opd_advantage(b["old_log_probs"], b["ref_log_prob"], b["response_mask"])
    assert torch.equal(output["advantages"], expected)
    assert "response_mask" not in output  # verl's rollout correction did not run
    assert not any(key.startswith(("rollout_corr/", "opd/rollout_vs_train")) for key in metrics), sorted(metrics)
