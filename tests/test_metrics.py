"""The precision probe and the EOS/mask metrics of ``verl_opd.core.metrics`` (pure torch)."""

from __future__ import annotations

import pytest
import torch

from verl_opd.core.metrics import eos_metrics, low_precision_grid_fraction

# What the probe must separate: values that went through bf16/fp16 (fraction 1.0) and fp32 ones (about 0.01 or
# less, see the docstring); 0.5 is the documented line between the two.
FIRES = 0.5


def _synthetic_log_probs(n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(1, n, generator=g) * 8  # log-probs of magnitude 0-8, as sampled tokens have


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_probe_fires_on_low_precision_log_probs_and_not_on_fp32(low: torch.dtype) -> None:
    fp32 = _synthetic_log_probs()
    mask = torch.ones_like(fp32, dtype=torch.bool)
    rounded = fp32.to(low).to(torch.float32)
    assert low_precision_grid_fraction(rounded, mask) == 1.0
    assert low_precision_grid_fraction(fp32, mask) < 0.02


def test_probe_on_a_real_model_fp32_quiet_bf16_fires() -> None:
    """log_softmax of a real (tiny, random) LM head in fp32 vs the same computed in bf16."""
    torch.manual_seed(0)
    hidden, vocab, tokens = 64, 512, 400
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(tokens, hidden) * 4  # logits of magnitude ~10, like a trained model's
    targets = torch.randint(0, vocab, (tokens,))
    fp32 = torch.log_softmax(head(states), dim=-1).gather(1, targets[:, None]).T
    bf16_head = head.to(torch.bfloat16)
    bf16 = torch.log_softmax(bf16_head(states.bfloat16()), dim=-1).gather(1, targets[:, None]).T.float()
    mask = torch.ones_like(fp32, dtype=torch.bool)
    assert low_precision_grid_fraction(fp32, mask) < 0.02
    assert low_precision_grid_fraction(bf16, mask) > FIRES


def test_probe_ignores_masked_and_near_zero_values() -> None:
    # fp32 cancellation leaves confident tokens' log-probs at a few significant bits (e.g. -2^-20): not counted
    values = torch.tensor([[-(2.0**-20), -0.25, 3.0, -1.0]])
    mask = torch.tensor([[True, True, False, False]])
    assert low_precision_grid_fraction(values, mask) == 0.0


def test_eos_metrics_pad_equal_to_eos() -> None:
    eos = pad = 2
    responses = torch.tensor([[5, 7, eos, pad, pad], [9, 4, 4, 4, 4], [8, eos, pad, pad, pad]])
    good_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    m = eos_metrics(responses, good_mask, [eos])
    assert m["opd/eos_terminated_frac"] == pytest.approx(2 / 3)  # the sampled EOS is in the mask
    assert m["opd/response_tokens_after_eos"] == 0.0  # padding is not
    # a mask built from "id != pad" drops the EOS: no sequence then ends in one
    id_mask = (responses != pad).long()
    assert eos_metrics(responses, id_mask, [eos])["opd/eos_terminated_frac"] == 0.0
    # a mask that lets the padding in counts it
    assert eos_metrics(responses, torch.ones_like(good_mask), [eos])["opd/response_tokens_after_eos"] == 5.0


def test_eos_metrics_several_eos_ids_and_empty_rows() -> None:
    responses = torch.tensor([[3, 11, 0], [3, 12, 0], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    m = eos_metrics(responses, mask, [11, 12])
    assert m == {"opd/eos_terminated_frac": 1.0, "opd/response_tokens_after_eos": 0.0}
