"""``adv_estimator=opd`` through verl's own registry and ``compute_advantage``, and ``opd_metrics``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import verl  # noqa: F401  (loads verl and its verl.plugins entry points in this process)

from verl_opd import compute_opd_advantage
from verl_opd.core.advantage import opd_token_rewards
from verl_opd.core.metrics import opd_metrics
from verl_opd.glue.estimator import compute_opd_estimator, register


@pytest.fixture(scope="module")
def verl_api():
    """verl's estimator API, with ``opd`` registered (twice: register() must be idempotent)."""
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import compute_advantage

    register()
    register()
    return {
        "DataProto": DataProto,
        "AlgoConfig": AlgoConfig,
        "core_algos": core_algos,
        "compute_advantage": compute_advantage,
    }


def _batch(seed: int = 0, batch: int = 4, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(batch, length, generator=g) * 3
    teacher = -torch.rand(batch, length, generator=g) * 3
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    mask[3, 1:3] = 0  # a hole, as in multi-turn tool output
    return student, teacher, mask


def _run_verl_compute_advantage(verl_api, token_level_rewards, mask, gamma=1.0):
    data = verl_api["DataProto"].from_dict(
        tensors={"token_level_rewards": token_level_rewards, "response_mask": mask},
        non_tensors={"uid": np.array([f"u{i // 2}" for i in range(mask.shape[0])], dtype=object)},
    )
    config = verl_api["AlgoConfig"](adv_estimator="opd", gamma=gamma)
    out = verl_api["compute_advantage"](
        data,
        adv_estimator=config.adv_estimator,
        gamma=config.gamma,
        lam=config.lam,
        num_repeat=2,
        norm_adv_by_std_in_grpo=config.norm_adv_by_std_in_grpo,
        config=config,
    )
    return out.batch["advantages"], out.batch["returns"]


# --------------------------------------------------------------------------- registry


def test_register_is_idempotent_and_estimator_is_found(verl_api):
    core_algos = verl_api["core_algos"]
    register()
    assert core_algos.get_adv_estimator_fn("opd") is compute_opd_estimator


def test_register_keeps_our_entry_after_a_module_reload(verl_api, monkeypatch):
    """A reloaded module has a new function object; verl would raise on it, register() must not."""
    core_algos = verl_api["core_algos"]

    def reloaded(token_level_rewards, response_mask, config=None, **kwargs):  # pragma: no cover
        raise AssertionError

    reloaded.__verl_opd_estimator__ = True
    monkeypatch.setitem(core_algos.ADV_ESTIMATOR_REGISTRY, "opd", reloaded)
    register()
    assert core_algos.ADV_ESTIMATOR_REGISTRY["opd"] is reloaded


def test_register_refuses_a_foreign_opd_estimator(verl_api, monkeypatch):
    core_algos = verl_api["core_algos"]

    def foreign(token_level_rewards, response_mask, config=None, **kwargs):  # pragma: no cover
        raise AssertionError

    monkeypatch.setitem(core_algos.ADV_ESTIMATOR_REGISTRY, "opd", foreign)
    with pytest.raises(ValueError, match="not verl-opd's"):
        register()


def test_verl_register_adv_est_raises_on_a_different_function(verl_api, monkeypatch):
    """Documents the verl behaviour register() works around."""
    core_algos = verl_api["core_algos"]
    # restore the registry entry afterwards even if verl's behaviour changes
    monkeypatch.setitem(core_algos.ADV_ESTIMATOR_REGISTRY, "opd", compute_opd_estimator)
    with pytest.raises(ValueError, match="already been registered"):
        core_algos.register_adv_est("opd")(lambda **kw: None)
    assert core_algos.get_adv_estimator_fn("opd") is compute_opd_estimator


# --------------------------------------------------------------------------- through verl's compute_advantage


def test_compute_advantage_matches_pure_function_and_ignores_gamma(verl_api):
    student, teacher, mask = _batch()
    rewards = opd_token_rewards(student, teacher, mask, kl_coef=0.5)
    adv, ret = _run_verl_compute_advantage(verl_api, rewards, mask, gamma=1.0)
    expected, _ = compute_opd_advantage(student, teacher, mask, kl_coef=0.5, discount=0.0)
    assert torch.equal(adv, expected)
    assert torch.equal(ret, expected)
    # gamma=1.0 would have summed future rewards: make sure that is a different answer.
    summed, _ = compute_opd_advantage(student, teacher, mask, kl_coef=0.5, discount=1.0)
    assert not torch.allclose(adv, summed)


def test_compute_advantage_sign_and_teacher_equals_student(verl_api):
    student = torch.tensor([[-0.1, -3.0, -1.0], [-1.0, -1.0, -1.0]])
    teacher = torch.tensor([[-2.0, -0.5, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, _ = _run_verl_compute_advantage(verl_api, opd_token_rewards(student, teacher, mask), mask)
    assert adv[0, 0] < 0  # student more confident than teacher
    assert adv[0, 1] > 0  # teacher likes the token more
    assert torch.equal(adv[1], torch.zeros(3))

    s, t, m = _batch(seed=5)
    adv_same, ret_same = _run_verl_compute_advantage(verl_api, opd_token_rewards(s, s.clone(), m), m)
    assert torch.equal(adv_same, torch.zeros_like(s))
    assert torch.equal(ret_same, torch.zeros_like(s))


def test_estimator_function_reads_discount_kwarg_only():
    student, teacher, mask = _batch(seed=1)
    rewards = opd_token_rewards(student, teacher, mask)

    class Gamma1:
        gamma = 1.0

        def get(self, key, default=None):
            return getattr(self, key, default)

    adv, ret = compute_opd_estimator(rewards, mask, config=Gamma1(), index=np.array(["a"] * 4, dtype=object))
    assert torch.equal(adv, compute_opd_advantage(student, teacher, mask)[0])
    assert torch.equal(adv, ret)
    adv09, _ = compute_opd_estimator(rewards, mask, config=Gamma1(), discount=0.9)
    torch.testing.assert_close(adv09, compute_opd_advantage(student, teacher, mask, discount=0.9)[0])


def test_registered_opd_estimator_mixes_task_reward_on_every_token_with_group_baseline(verl_api):
    """The trainer's call path: get_adv_estimator_fn("opd") with verl's uid index and the OPD keywords."""
    fn = verl_api["core_algos"].get_adv_estimator_fn("opd")
    student, teacher, mask = _batch(seed=3)
    kl = opd_token_rewards(student, teacher, mask, kl_coef=0.5)
    uid = np.array(["p0", "p0", "p1", "p1"], dtype=object)
    rewards = torch.tensor([1.0, 0.0, 0.25, 0.75])
    adv, ret = fn(
        token_level_rewards=kl,
        response_mask=mask,
        config=verl_api["AlgoConfig"](adv_estimator="opd", gamma=1.0),
        index=uid,
        discount=0.5,
        sequence_rewards=rewards,
        task_reward_coef=2.0,
    )
    kl_part, _ = compute_opd_advantage(student, teacher, mask, kl_coef=0.5, discount=0.5)
    centred = torch.tensor([0.5, -0.5, -0.25, 0.25])  # R minus its prompt's mean, no std division
    expected = kl_part + 2.0 * centred.unsqueeze(1) * mask
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    assert torch.equal(adv, ret)
    assert torch.equal(adv[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_verl_in_reward_kl_with_teacher_as_ref_equals_opd_token_rewards(verl_api):
    """verl's use_kl_in_reward path (teacher in the ref slot, k1) builds the same r_t."""
    from verl.trainer.ppo.core_algos import FixedKLController
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty

    student, teacher, mask = _batch(seed=2)
    scores = torch.zeros(student.shape)
    scores[0, -1] = 1.0
    data = verl_api["DataProto"].from_dict(
        tensors={
            "old_log_probs": student,
            "ref_log_prob": teacher,
            "response_mask": mask,
            "token_level_scores": scores,
        }
    )
    data, _ = apply_kl_penalty(data, kl_ctrl=FixedKLController(kl_coef=0.25), kl_penalty="kl")
    ours = opd_token_rewards(student, teacher, mask, kl_coef=0.25) + scores
    torch.testing.assert_close(data.batch["token_level_rewards"], ours, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- metrics


def _metrics_example():
    nan, ninf = float("nan"), float("-inf")
    student = torch.tensor([[-1.0, -2.0, -0.5, nan], [-3.0, ninf, ninf, ninf]])
    teacher = torch.tensor([[-2.0, -1.0, -0.5, ninf], [-1.0, nan, nan, nan]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    return student, teacher, mask


def test_opd_metrics_hand_checked():
    student, teacher, mask = _metrics_example()
    adv, _ = compute_opd_advantage(student, teacher, mask)  # [[-1, 1, 0, 0], [2, 0, 0, 0]]
    rollout = student + torch.tensor([[0.125, -0.25, 0.0, 9.0], [0.5, 9.0, 9.0, 9.0]])
    m = opd_metrics(student, teacher, mask, adv, rollout_log_probs=rollout)
    expected = {
        "opd/reverse_kl": (1 - 1 + 0 - 2) / 4,
        "opd/reverse_kl_per_seq": (0 + -2) / 2,
        "opd/teacher_log_prob": (-2 - 1 - 0.5 - 1) / 4,
        "opd/student_log_prob": (-1 - 2 - 0.5 - 3) / 4,
        "opd/advantage_mean": 0.5,
        "opd/advantage_std": math.sqrt(1.25),
        "opd/advantage_min": -1.0,
        "opd/advantage_max": 2.0,
        "opd/teacher_prefers_frac": 0.5,
        "opd/student_log_prob_lowp_frac": 1.0,  # -1, -2, -3 (|x| >= 0.5) all sit on the bf16 grid
        "opd/teacher_log_prob_lowp_frac": 1.0,
        "opd/rollout_vs_train_log_prob_abs_diff_mean": (0.125 + 0.25 + 0 + 0.5) / 4,
        "opd/rollout_vs_train_log_prob_abs_diff_max": 0.5,
        "opd/response_tokens": 4.0,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert isinstance(m[key], float), key
        assert m[key] == pytest.approx(value, abs=1e-7), key


def test_opd_metrics_without_rollout_log_probs_and_bf16():
    student, teacher, mask = _metrics_example()
    adv, _ = compute_opd_advantage(student, teacher, mask)
    m = opd_metrics(student.bfloat16(), teacher.bfloat16(), mask, adv)
    assert "opd/rollout_vs_train_log_prob_abs_diff_mean" not in m
    assert m["opd/reverse_kl"] == pytest.approx(-0.5)
    assert all(math.isfinite(v) for v in m.values())


def test_opd_metrics_all_zero_mask_is_zero_not_nan():
    student, teacher, _ = _metrics_example()
    mask = torch.zeros(2, 4, dtype=torch.long)
    m = opd_metrics(student, teacher, mask, torch.zeros(2, 4), rollout_log_probs=student)
    assert m["opd/response_tokens"] == 0.0
    assert len(m) == 14
    assert all(v == 0.0 for v in m.values())


def test_opd_metrics_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        opd_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 4))
