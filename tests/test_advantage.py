"""Unit tests for the pure OPD math in ``verl_opd.core.advantage`` (CPU, no verl)."""

from __future__ import annotations

import math

import pytest
import torch

from verl_opd import compute_opd_advantage
from verl_opd.core.advantage import discounted_reward_to_go, group_baselined_rewards, opd_token_rewards


def reference_reward_to_go(rewards: list[list[float]], mask: list[list[int]], discount: float) -> list[list[float]]:
    """Explicit python-loop reference: discount counts response tokens only."""
    out = []
    for row_r, row_m in zip(rewards, mask, strict=True):
        idx = [i for i, m in enumerate(row_m) if m]
        row = [0.0] * len(row_r)
        for pos, i in enumerate(idx):
            row[i] = sum(discount ** (later - pos) * row_r[idx[later]] for later in range(pos, len(idx)))
        out.append(row)
    return out


def _t(x, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# --------------------------------------------------------------------------- sign


def test_student_more_confident_than_teacher_gives_negative_advantage():
    student = _t([[-0.1, -3.0]])  # token 0: student sure, teacher not; token 1: the reverse
    teacher = _t([[-2.0, -0.5]])
    mask = torch.ones(1, 2)
    adv, _ = compute_opd_advantage(student, teacher, mask)
    assert adv[0, 0] < 0
    assert adv[0, 1] > 0
    torch.testing.assert_close(adv, _t([[-1.9, 2.5]]))


def test_teacher_equals_student_gives_exact_zero():
    torch.manual_seed(0)
    lp = -torch.rand(4, 7) * 5
    mask = (torch.rand(4, 7) > 0.3).long()
    for discount in (0.0, 0.9, 1.0):
        adv, ret = compute_opd_advantage(lp, lp.clone(), mask, kl_coef=2.5, discount=discount)
        assert torch.equal(adv, torch.zeros(4, 7))
        assert torch.equal(ret, torch.zeros(4, 7))


def test_kl_coef_scales_reward():
    student, teacher, mask = _t([[-1.0, -2.0]]), _t([[-1.5, -1.0]]), torch.ones(1, 2)
    adv, _ = compute_opd_advantage(student, teacher, mask, kl_coef=0.5)
    torch.testing.assert_close(adv, _t([[-0.25, 0.5]]))


# --------------------------------------------------------------------------- masking


def test_padding_gets_zero_and_garbage_there_does_not_leak():
    student = _t([[-1.0, -2.0, float("-inf"), float("nan")]])
    teacher = _t([[-0.5, -2.5, float("-inf"), 3.0]])
    mask = _t([[1, 1, 0, 0]], torch.long)
    for discount in (0.0, 0.9, 1.0):
        adv, _ = compute_opd_advantage(student, teacher, mask, discount=discount)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[0, 2:], torch.zeros(2))


def test_pad_id_equal_to_eos_id_eos_counts_padding_does_not():
    eos = pad = 2
    response_ids = torch.tensor([[5, 7, eos, pad, pad], [9, eos, pad, pad, pad]])
    # verl's response_mask comes from the attention mask, so the sampled EOS is 1 and
    # the padding after it is 0 although both carry the same id.
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert (response_ids == pad).sum() > (mask == 0).sum()  # an id-based mask would also drop the EOS
    student = _t([[-1.0, -1.0, -0.2, -0.3, -0.3], [-1.0, -0.1, -0.3, -0.3, -0.3]])
    teacher = _t([[-1.0, -1.0, -1.2, -5.0, -5.0], [-1.0, -0.6, -5.0, -5.0, -5.0]])
    adv, _ = compute_opd_advantage(student, teacher, mask)
    # The EOS token carries signal: the student ended the answer more eagerly than the teacher.
    torch.testing.assert_close(adv[0, 2], torch.tensor(-1.0))
    torch.testing.assert_close(adv[1, 1], torch.tensor(-0.5))
    # Padding (same id as EOS) gets exactly 0.
    assert torch.equal(adv[0, 3:], torch.zeros(2))
    assert torch.equal(adv[1, 2:], torch.zeros(3))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32, torch.bfloat16])
def test_mask_dtype_does_not_matter(mask_dtype):
    student, teacher = _t([[-1.0, -2.0, -3.0]]), _t([[-2.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]]).to(mask_dtype)
    adv, _ = compute_opd_advantage(student, teacher, mask, discount=0.5)
    torch.testing.assert_close(adv, _t([[-1.0, 0.0, 0.0]]))


# --------------------------------------------------------------------------- discount


def test_discount_zero_is_exactly_masked_rewards():
    torch.manual_seed(1)
    rewards = torch.randn(3, 6)
    mask = (torch.rand(3, 6) > 0.4).float()
    assert torch.equal(discounted_reward_to_go(rewards, mask, 0.0), rewards * mask)


def test_discount_hand_written_example():
    rewards = _t([[1.0, 2.0, 3.0, 0.0, 0.0]])
    mask = _t([[1, 1, 1, 0, 0]])
    # A_2 = 3; A_1 = 2 + 0.9 * 3 = 4.7; A_0 = 1 + 0.9 * 4.7 = 5.23
    torch.testing.assert_close(discounted_reward_to_go(rewards, mask, 0.9), _t([[5.23, 4.7, 3.0, 0.0, 0.0]]))
    # discount 1: plain suffix sums
    torch.testing.assert_close(discounted_reward_to_go(rewards, mask, 1.0), _t([[6.0, 5.0, 3.0, 0.0, 0.0]]))
    # discount 0: per token
    torch.testing.assert_close(discounted_reward_to_go(rewards, mask, 0.0), rewards)


def test_mask_hole_in_the_middle_is_skipped():
    # A tool-output hole at position 1: its reward is ignored and it does not count in the exponent.
    rewards = _t([[1.0, 99.0, 2.0, 3.0, 0.0]])
    mask = _t([[1, 0, 1, 1, 0]])
    expected = _t([[1.0 + 0.9 * (2.0 + 0.9 * 3.0), 0.0, 2.0 + 0.9 * 3.0, 3.0, 0.0]])
    torch.testing.assert_close(discounted_reward_to_go(rewards, mask, 0.9), expected)


@pytest.mark.parametrize("discount", [0.0, 0.5, 0.9, 1.0])
def test_discount_matches_python_loop_reference(discount):
    torch.manual_seed(2)
    student = -torch.rand(5, 9) * 4
    teacher = -torch.rand(5, 9) * 4
    mask = (torch.rand(5, 9) > 0.25).long()
    mask[0] = 0  # an empty row
    mask[1, 6:] = 0  # right padding
    mask[2, 3:5] = 0  # a hole
    adv, _ = compute_opd_advantage(student, teacher, mask, kl_coef=0.7, discount=discount)
    r = (-0.7 * (student - teacher)).tolist()
    expected = _t(reference_reward_to_go(r, mask.tolist(), discount))
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- task rewards


def test_task_reward_credits_every_response_token():
    mask = _t([[1, 1, 1, 0], [1, 1, 0, 0]])
    lp = torch.full((2, 4), -1.0)
    adv, _ = compute_opd_advantage(lp, lp, mask, sequence_rewards=_t([1.0, 0.0]), task_reward_coef=0.5)
    # no groups: baseline 0, so each sequence's tokens all get 0.5 * R; padding stays 0
    torch.testing.assert_close(adv, _t([[0.5, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))

    # Mixed with a KL reward, discount 0: the two simply add on every token.
    student = _t([[-1.0, -2.0, -1.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    teacher = _t([[-1.5, -1.0, -1.25, 0.0], [-1.0, -3.0, 0.0, 0.0]])
    adv, _ = compute_opd_advantage(student, teacher, mask, sequence_rewards=_t([1.0, 0.0]), task_reward_coef=0.5)
    torch.testing.assert_close(adv, _t([[-0.5 + 0.5, 1.0 + 0.5, -0.25 + 0.5, 0.0], [0.0, -2.0, 0.0, 0.0]]))


def test_task_reward_group_baseline_is_the_group_mean_without_std():
    mask = torch.ones(5, 2)
    lp = torch.zeros(5, 2)
    rewards = _t([1.0, 0.0, 0.5, 3.0, 7.0])
    index = ["a", "a", "b", "b", "c"]  # groups of 2, 2 and 1
    adv, _ = compute_opd_advantage(lp, lp, mask, sequence_rewards=rewards, task_reward_coef=2.0, index=index)
    # a: mean 0.5 -> +-0.5; b: mean 1.75 -> -1.25, +1.25 (no std division); c alone: baseline 0
    expected = 2.0 * _t([0.5, -0.5, -1.25, 1.25, 7.0])
    torch.testing.assert_close(adv, expected.unsqueeze(1).expand(5, 2))
    assert torch.equal(group_baselined_rewards(rewards, None), rewards)


def test_task_reward_survives_a_masked_last_token():
    # a multi-turn response ending in tool output: the last positions are masked, the reward is not lost
    mask = _t([[1, 1, 0, 0]])
    lp = torch.zeros(1, 4)
    adv, _ = compute_opd_advantage(lp, lp, mask, sequence_rewards=_t([1.0]), task_reward_coef=1.0)
    torch.testing.assert_close(adv, _t([[1.0, 1.0, 0.0, 0.0]]))


def test_discount_applies_to_the_kl_part_only():
    mask = _t([[1, 1, 1, 0]])
    student = _t([[-1.0, -1.0, -1.0, 0.0]])
    teacher = _t([[-1.0, -1.0, 0.0, 0.0]])  # r = [0, 0, 1]
    adv, _ = compute_opd_advantage(
        student, teacher, mask, discount=0.9, sequence_rewards=_t([1.0]), task_reward_coef=2.0
    )
    torch.testing.assert_close(adv, _t([[0.81 + 2.0, 0.9 + 2.0, 1.0 + 2.0, 0.0]]))


def test_task_rewards_ignored_when_coef_zero():
    mask = torch.ones(1, 2)
    lp = _t([[-1.0, -2.0]])
    adv, _ = compute_opd_advantage(lp, lp, mask, sequence_rewards=torch.ones(1), task_reward_coef=0.0)
    assert torch.equal(adv, torch.zeros(1, 2))


def test_task_rewards_must_be_one_per_sequence():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(2,\).*one task reward per sequence"):
        compute_opd_advantage(z, z, torch.ones(2, 3), sequence_rewards=torch.zeros(2, 3), task_reward_coef=1.0)
    with pytest.raises(ValueError, match=r"index has 3 entries for 2"):
        compute_opd_advantage(
            z, z, torch.ones(2, 3), sequence_rewards=torch.zeros(2), task_reward_coef=1.0, index=["a", "b", "c"]
        )


# --------------------------------------------------------------------------- precision


def test_bf16_inputs_give_float32_and_subtract_in_float32():
    # Both values are exact in bf16; their difference 8.9921875 is not (bf16 step at 8-16 is 0.0625).
    s = torch.tensor([[-1.0078125]], dtype=torch.bfloat16)
    t = torch.tensor([[-10.0]], dtype=torch.bfloat16)
    bf16_diff = (s - t).float()
    fp32_diff = s.float() - t.float()
    assert not torch.equal(bf16_diff, fp32_diff)  # the example really discriminates
    rewards = opd_token_rewards(s, t, torch.ones(1, 1))
    assert rewards.dtype == torch.float32
    assert torch.equal(rewards, -fp32_diff)
    adv, ret = compute_opd_advantage(s, t, torch.ones(1, 1))
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert torch.equal(adv, -fp32_diff)


def test_fp16_inputs_give_float32_and_subtract_in_float32():
    s = torch.tensor([[-1.0009765625]], dtype=torch.float16)  # 1 + 2^-10, exact in fp16
    t = torch.tensor([[-10.0]], dtype=torch.float16)
    fp32_diff = s.float() - t.float()
    assert not torch.equal((s - t).float(), fp32_diff)
    adv, _ = compute_opd_advantage(s, t, torch.ones(1, 1), discount=0.9)
    assert adv.dtype == torch.float32
    assert torch.equal(adv, -fp32_diff)


def test_mixed_precision_inputs():
    s = torch.tensor([[-1.0078125]], dtype=torch.bfloat16)
    t = torch.tensor([[-10.0]], dtype=torch.float32)
    adv, _ = compute_opd_advantage(s, t, torch.ones(1, 1))
    assert adv.dtype == torch.float32
    assert torch.equal(adv, -(s.float() - t))


# --------------------------------------------------------------------------- gradients, normalisation


def test_no_gradient_flows():
    student = torch.randn(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    scores = torch.randn(2, requires_grad=True)
    for discount in (0.0, 0.9):
        adv, ret = compute_opd_advantage(
            student, teacher, torch.ones(2, 3), discount=discount, sequence_rewards=scores, task_reward_coef=1.0
        )
        assert not adv.requires_grad and adv.grad_fn is None
        assert not ret.requires_grad


def test_returns_equal_advantages():
    torch.manual_seed(3)
    adv, ret = compute_opd_advantage(torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, 4), discount=0.9)
    assert torch.equal(adv, ret)


def test_no_normalisation():
    torch.manual_seed(4)
    student = -torch.rand(4, 5) * 3
    teacher = -torch.rand(4, 5) * 3
    mask = torch.ones(4, 5)
    adv, _ = compute_opd_advantage(student, teacher, mask)
    adv10, _ = compute_opd_advantage(student * 10, teacher * 10, mask)
    torch.testing.assert_close(adv10, adv * 10, rtol=1e-5, atol=1e-5)
    # A constant KL across a "group" stays as it is (group normalisation would zero it).
    const, _ = compute_opd_advantage(torch.full((4, 5), -1.0), torch.full((4, 5), -1.5), mask)
    assert torch.equal(const, torch.full((4, 5), -0.5))
    # A single token is not whitened to 0 or 1 either.
    single, _ = compute_opd_advantage(_t([[-0.25]]), _t([[-3.25]]), torch.ones(1, 1))
    assert single.item() == -3.0


# --------------------------------------------------------------------------- validation


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"shape mismatch.*student_log_probs=\(2, 3\).*teacher_log_probs=\(2, 4\)"):
        compute_opd_advantage(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"shape mismatch.*response_mask=\(2, 1\)"):
        compute_opd_advantage(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"shape mismatch.*rewards=\(2, 3\).*response_mask=\(2, 2\)"):
        discounted_reward_to_go(torch.zeros(2, 3), torch.ones(2, 2), 0.9)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()])
def test_non_2d_input_raises(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"student_log_probs must be 2-D \(batch, response_length\)"):
        compute_opd_advantage(x, x, x)
    with pytest.raises(ValueError, match=r"rewards must be 2-D"):
        discounted_reward_to_go(x, x, 0.0)


def test_non_tensor_input_raises():
    with pytest.raises(ValueError, match=r"teacher_log_probs must be a torch.Tensor"):
        compute_opd_advantage(torch.zeros(1, 2), [[0.0, 0.0]], torch.ones(1, 2))


@pytest.mark.parametrize("discount", [-0.1, 1.5, math.nan, math.inf, True, "0.9x", None])
def test_discount_out_of_range_raises(discount):
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"discount must be a number in \[0, 1\]"):
        compute_opd_advantage(z, z, torch.ones(1, 2), discount=discount)
    with pytest.raises(ValueError, match=r"discount must be a number in \[0, 1\]"):
        discounted_reward_to_go(z, torch.ones(1, 2), discount)


@pytest.mark.parametrize("kl_coef", [math.inf, -math.inf, math.nan])
def test_non_finite_kl_coef_raises(kl_coef):
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"kl_coef must be finite"):
        compute_opd_advantage(z, z, torch.ones(1, 2), kl_coef=kl_coef)


def test_negative_kl_coef_raises():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"kl_coef must be >= 0.*flips the sign"):
        compute_opd_advantage(z, z, torch.ones(1, 2), kl_coef=-1.0)


def test_bad_task_reward_coef_raises():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"task_reward_coef must be finite"):
        compute_opd_advantage(z, z, torch.ones(1, 2), sequence_rewards=torch.ones(1), task_reward_coef=math.nan)
    with pytest.raises(ValueError, match=r"task_reward_coef must be >= 0"):
        compute_opd_advantage(z, z, torch.ones(1, 2), sequence_rewards=torch.ones(1), task_reward_coef=-0.5)


def test_task_reward_coef_without_task_rewards_raises():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"task_reward_coef=0.5 but no sequence rewards.*task_reward_coef=0"):
        compute_opd_advantage(z, z, torch.ones(1, 2), task_reward_coef=0.5)
