"""The exact cross-tokenizer toy (design note §4 T2): bias C and its shaping, bias A and its guard, no sampling.

Same text distribution P (120 strings, seed 0) as a Llama-3-like teacher (digit groups of <= 3) and a Qwen-like
student (one token per digit) that may also spell ``ab`` as ``[a][b]``; see :mod:`verl_opd.tiny.xtok_toy`.
Every expectation is an exact sum. Bounds come from ``benchmarks/xtok_toy.py`` (seeds 0-2, recorded in
``benchmarks/results/xtok_toy.md``); the measured values are in each test's comments. Training here runs
200 steps (the benchmark 1500) to stay a few seconds on one core.
"""

from __future__ import annotations

import pytest
import torch

from verl_opd.tiny.xtok_toy import ExactToy, toy_distribution

STEPS, LR = 200, 2.0


@pytest.fixture(scope="module")
def toy() -> ExactToy:
    return ExactToy(toy_distribution(0))


@pytest.fixture(scope="module")
def optimum(toy: ExactToy) -> torch.Tensor:
    """The student at P_S = P_T: the canonical-trie LM of the teacher's P over the student's tokenizer."""
    logits = toy.canonical_logits(toy.probs)
    assert toy.string_tv(logits) < 1e-12 and toy.noncanonical_mass(logits) == 0.0
    return logits


@pytest.fixture(scope="module")
def perturbed(toy: ExactToy) -> torch.Tensor:
    """A canonical student of another distribution (TV 0.475 from P; 0.475-0.533 over the benchmark's seeds 0-2)."""
    return toy.canonical_logits(toy_distribution(1))


def _sequence_sums(toy: ExactToy, logits: torch.Tensor, shaping: bool) -> torch.Tensor:
    d, row = toy.chunk_log_ratios(logits, shaping)
    return torch.zeros(len(toy.leaves), dtype=torch.float64).index_add(0, row, d)


@pytest.mark.parametrize("shaping", [False, True])
def test_chunk_terms_sum_to_the_sequence_log_ratio(toy, optimum, perturbed, shaping) -> None:
    """Sum_c d_c = log S(y) - log T(kappa_T(s)): 0 at the optimum (measured 1.2e-15), shaped or not."""
    assert _sequence_sums(toy, optimum, shaping).abs().max().item() <= 1e-9
    sums = _sequence_sums(toy, perturbed, shaping)
    torch.testing.assert_close(sums, _sequence_sums(toy, perturbed, not shaping), rtol=0, atol=1e-12)
    assert sums.abs().max().item() > 0.1  # not vacuous: a different student has nonzero sequence log-ratios


def test_lookahead_gives_nonzero_chunks_at_the_optimum_and_shaping_removes_it(toy, optimum, perturbed) -> None:
    d, _ = toy.chunk_log_ratios(optimum, shaping=False)
    # Unshaped: 48 of 424 chunks nonzero, max |d| 4.1, E mean|d| 0.27-0.30 over seeds (0.74-0.81 for another teacher).
    assert (d.abs() > 1e-3).sum().item() >= 30 and d.abs().max().item() > 1.0
    mean_abs = toy.mean_abs_chunk_log_ratio(optimum, shaping=False)
    assert 0.2 < mean_abs < 0.5 * toy.mean_abs_chunk_log_ratio(perturbed, shaping=False)
    shaped, _ = toy.chunk_log_ratios(optimum, shaping=True)
    assert shaped.abs().max().item() <= 1e-9  # measured 8.9e-16


@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_expected_gradient_at_the_optimum(toy, optimum, discount) -> None:
    """Unshaped, the optimum is not a fixed point (max |grad| 0.087-0.104 at discount 0, 0.030-0.049 at 1); shaped,
    it is (measured 6.5e-17 and 2.2e-16)."""
    assert toy.gradient(optimum, guard=True, shaping=False, discount=discount).abs().max().item() > 0.01
    for guard in (False, True):
        assert toy.gradient(optimum, guard=guard, shaping=True, discount=discount).abs().max().item() <= 1e-10


def test_exact_training_converges_to_the_teacher_only_with_shaping(toy, perturbed) -> None:
    """After 200 steps: unshaped TV 0.534-0.576 (a fixed point: unchanged by 1500 steps); shaped 0.0000-0.0008."""
    unshaped = toy.string_tv(toy.train(perturbed, steps=STEPS, lr=LR, guard=True, shaping=False))
    shaped = toy.string_tv(toy.train(perturbed, steps=STEPS, lr=LR, guard=True, shaping=True))
    assert unshaped > 0.4
    assert shaped < 0.005


def test_guard_stops_the_student_paying_itself_for_a_non_canonical_split(toy, perturbed) -> None:
    """10% of the root on [a][b] (mass 0.091); shaped, 200 steps, seeds 0-2: unguarded the split grows to 0.33-0.35
    (TV 0.18), guarded it shrinks to 0.031-0.032 (TV 0.016-0.018) and keeps shrinking (1500 steps: the benchmark)."""
    opened = toy.open_noncanonical(perturbed, 0.1)
    start_mass = toy.noncanonical_mass(opened)
    unguarded = toy.train(opened, steps=STEPS, lr=LR, guard=False, shaping=True)
    guarded = toy.train(opened, steps=STEPS, lr=LR, guard=True, shaping=True)
    assert toy.noncanonical_mass(unguarded) > 2 * start_mass
    assert toy.noncanonical_mass(guarded) < 0.5 * start_mass
    assert toy.string_tv(guarded) < 0.5 * toy.string_tv(unguarded)
