"""Unit tests for the pure boundary-potential shaping in ``verl_opd.core.xtok_shaping`` (CPU, no verl)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from verl_opd.core.xtok_shaping import (
    extension_log_mass,
    extension_table,
    potential_shift,
    shaped_chunk_log_ratio,
    teacher_potential,
)


def _random_byte_table(size: int, seed: int) -> list[bytes]:
    """Short random byte strings over a few byte values, 0xff included (the prefix-range edge case), duplicates too."""
    rng = random.Random(seed)
    alphabet = [0x00, 0x61, 0x62, 0xC3, 0xFE, 0xFF]
    return [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(size)]


def test_extension_table_matches_brute_force_with_specials() -> None:
    table = _random_byte_table(400, seed=0) + [b"<|eot|>", b""]
    special = {400, 401}
    ext = extension_table(table, special_ids=special)
    text = [j for j in range(len(table)) if j not in special]
    for i, token in enumerate(table):
        expected = {i} if i in special else {j for j in text if table[j].startswith(token)}
        assert set(ext.extensions(i).tolist()) == expected, i
    assert sorted(ext.order.tolist()) == list(range(len(table)))


def test_extension_table_refuses_an_empty_text_token() -> None:
    with pytest.raises(ValueError, match=r"\[1\] have no bytes but are not in special_ids"):
        extension_table([b"a", b"", b"ab"])
    with pytest.raises(ValueError, match="outside the byte table"):
        extension_table([b"a"], special_ids={3})


def test_extension_log_mass_is_the_logsumexp_over_extensions() -> None:
    table = _random_byte_table(300, seed=1)
    ext = extension_table(table)
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(50, len(table), generator=generator, dtype=torch.float64) * 4, dim=1)
    last = torch.randint(len(table), (50,), generator=generator)
    got = extension_log_mass(log_probs, last, ext)
    expected = torch.stack([torch.logsumexp(log_probs[n, ext.extensions(int(i))], 0) for n, i in enumerate(last)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert bool((got >= log_probs[torch.arange(50), last]).all())  # every id extends itself
    on_device = ext.to("cpu")  # the tensor form the logits hook keeps on the accelerator
    assert isinstance(on_device.order, torch.Tensor) and on_device.order.dtype == torch.long
    assert torch.equal(extension_log_mass(log_probs, last, on_device), got)


def test_extension_log_mass_keeps_a_tiny_mass_exact() -> None:
    """A 1e-30 extension mass next to an O(1) vocabulary mass: no cancellation (a cumsum difference would give 0)."""
    table = [b"a", b"ab", b"b"]
    log_probs = torch.log(torch.tensor([[1e-30, 1e-30, 1.0 - 2e-30]], dtype=torch.float64))
    got = extension_log_mass(log_probs, torch.tensor([0]), extension_table(table))
    assert got.item() == pytest.approx(np.log(2e-30), abs=1e-12)


def test_extension_log_mass_rejects_a_vocabulary_mismatch() -> None:
    with pytest.raises(ValueError, match="extension table 2"):
        extension_log_mass(torch.zeros(1, 3), torch.tensor([0]), extension_table([b"a", b"b"]))


def test_teacher_potential_reads_each_chunks_last_token_and_zeroes_after_eos() -> None:
    log_probs = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25], dtype=torch.float64)
    ext_mass = torch.tensor([-0.9, -1.0, -0.5, -2.0, -0.25], dtype=torch.float64)
    chunk = np.array([0, 0, 1, 2, 3])
    phi = teacher_potential(log_probs, ext_mass, chunk, 4, ends_with_eos=False)
    torch.testing.assert_close(phi, torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))  # token 0 is mid-chunk
    ended = teacher_potential(log_probs, ext_mass, chunk, 4, ends_with_eos=True)
    assert ended[-1].item() == 0.0 and torch.equal(ended[:-1], phi[:-1])
    with pytest.raises(ValueError, match="every chunk at least one token"):
        teacher_potential(log_probs, ext_mass, np.array([0, 0, 2, 2, 3]), 4, ends_with_eos=True)


def test_shaping_moves_the_lookahead_to_the_next_chunk_and_keeps_the_sum() -> None:
    """The teacher's "57" (mass 0.2) is 0.5 of its byte-prefix mass: Phi_T = log 2 raises chunk 0's teacher score."""
    d = torch.tensor([0.7, -0.7, 0.0], dtype=torch.float64)  # chunk, next chunk, EOS chunk
    phi_teacher = torch.tensor([np.log(2.0), 0.0, 0.0], dtype=torch.float64)
    shaped = shaped_chunk_log_ratio(d, None, phi_teacher)
    torch.testing.assert_close(shaped, torch.tensor([0.7 - np.log(2.0), -0.7 + np.log(2.0), 0.0], dtype=torch.float64))
    phi_student = torch.tensor([0.3, 0.1, 0.0], dtype=torch.float64)
    both = shaped_chunk_log_ratio(d, phi_student, phi_teacher)
    torch.testing.assert_close(both - shaped, torch.tensor([0.3, -0.2, -0.1], dtype=torch.float64))
    assert abs(both.sum().item() - d.sum().item()) < 1e-15
    torch.testing.assert_close(potential_shift(phi_student, phi_teacher), both - d)
    with pytest.raises(ValueError, match="one entry per chunk"):
        shaped_chunk_log_ratio(d[:2], None, phi_teacher)
