"""``opd.teacher.shaping`` through verl's real ``main_ppo``: the boundary-lookahead potentials from verl's engine.

The teacher's potentials come from its forward through verl's per-token logits hook, the student's from one
more forward of the actor (``verl_opd.glue.shaping``). A byte-identical copy must cancel them exactly (and,
being read in its own view, give advantage 0 like ``view=student``); a teacher of another family must move
the chunk scores. The potentials themselves are checked against brute force in ``tests/test_own_view.py``.
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.e2e


def test_shaping_of_a_copy_cancels_in_verls_engine(tiny, trained_other, view_args, main_ppo, tmp_path):
    """A byte-identical copy of the student read in its own view, ``shaping=both``: advantage 0 (|A| < 1e-4) and
    KL 0, every chunk one token; the teacher's potentials from its forward and the student's from the actor's
    extra forward through verl's engine cancel exactly.

    The student writes in the other family's tokenizer, whose merged tokens (digit groups) carry lookahead, so
    each side's potential is non-zero (the next test shows the teacher's moving the scores).
    ``rollout.top_k=1`` (greedy): at temperature 1 this small model writes, about once in a hundred responses,
    a stray byte (the teacher reads U+FFFD) or a non-canonical split (`` `` + ``####`` where its tokenizer has
    `` ####``); the guard masks that chunk, but the two models then condition the rest of the response on
    different token sequences, a real difference and not the one checked here. Greedy responses are the
    model's canonical answers, and truncating the sampling leaves the log-probs, and so the check, exact.
    """
    teacher = tmp_path / "teacher_copy"
    shutil.copytree(trained_other, teacher)
    args = view_args(tiny, trained_other, teacher, "own") + [
        "+opd.teacher.shaping=both",
        "actor_rollout_ref.rollout.top_k=1",
    ]
    run = main_ppo(args, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    assert "the teacher reads its own view" in run.output
    assert "boundary-lookahead shaping both: opd.teacher.shaping=both" in run.output
    m = run.steps[1]
    assert abs(m["critic/advantages/max"]) < 1e-4 and abs(m["critic/advantages/min"]) < 1e-4, m
    assert abs(m["opd/reverse_kl"]) < 1e-4, m
    assert m["opd/xtok/masked_token_frac/prompt_cut"] == 0.0, m
    assert m["opd/xtok/teacher_student_length_ratio"] == 1.0, m
    assert m["opd/xtok/shaping_shift_abs_mean"] < 1e-6, m
    assert m["opd/xtok/one_to_one_chunk_frac"] == 1.0, m
    assert m["opd/xtok/masked_token_frac"] == 0.0, m  # every chunk scored: the zero is not from masking
    assert m["opd/xtok/noncanonical_token_frac"] == 0.0, m


def test_shaping_moves_another_familys_chunk_scores(tiny, trained_pair, other_teacher, view_args, main_ppo, tmp_path):
    """A teacher of another tokenizer with the default ``shaping=auto``: resolved to ``both``, the potentials
    from verl's logits hook move the chunk scores, and the run trains."""
    args = view_args(tiny, trained_pair.teacher, other_teacher, "own")
    run = main_ppo(args, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    assert "boundary-lookahead shaping both (auto): the teacher tokenises differently" in run.output
    m = run.steps[1]
    assert m["opd/xtok/shaping_shift_abs_mean"] > 1e-3, m  # measured 1.39, 1.42 (mean |shift| per chunk, nats)
    assert m["opd/xtok/one_to_one_chunk_frac"] < 1.0, m  # another tokenisation: multi-token chunks
    assert m["opd/reverse_kl"] > 0 and m["actor/grad_norm"] > 0, m
