"""``opd.teacher.view=own`` through verl's real ``main_ppo``: the teacher reads its own rendering, scored exactly.

The teacher worker re-renders each sample's conversation with the teacher's chat template and tokenizer,
re-encodes the student's response text, runs verl's forward on that batch and maps the log-probs back
onto the student's tokens by byte-aligned chunks (``verl_opd.glue.own_view``). With the student's own
tokenizer and template on both sides every chunk is one token, so the result must be the
``view=student`` advantage exactly: these tests check that through the whole pipeline (rendering,
TransferQueue, verl's engine, the registered estimator), where a wrong offset or a shifted log-prob
would show at once.
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.e2e

KEYS = (
    "critic/advantages/max",
    "critic/advantages/min",
    "critic/advantages/mean",
    "opd/reverse_kl",
    "opd/teacher_log_prob",
    "actor/grad_norm",
)
STEPS = 3


def test_own_view_matches_student_view_for_a_same_tokenizer_teacher(tiny, trained_pair, view_args, main_ppo, tmp_path):
    """A distinct teacher with the student's tokenizer: ``view=own`` gives ``view=student``'s numbers (< 1e-5).

    One prompt per step, so the ``hf`` rollout server (seeded once, batching concurrent requests by
    arrival) samples the same response in both runs; equal advantages then give equal updates, so
    every step's samples match too.
    """
    runs = {}
    # the well-trained model samples, the half-trained one teaches: the samples are valid, canonical text
    for view in ("student", "own"):
        args = view_args(tiny, trained_pair.teacher, trained_pair.student, view, steps=STEPS, batch=1)
        (tmp_path / view).mkdir()
        runs[view] = main_ppo(args, cwd=tmp_path / view)
        assert runs[view].returncode == 0, runs[view].tail()
    assert sorted(runs["own"].steps) == sorted(runs["student"].steps) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        student_view, own_view = runs["student"].steps[step], runs["own"].steps[step]
        # the own view re-rendered and re-encoded the same samples into one-token chunks
        assert own_view["opd/xtok/one_to_one_chunk_frac"] == 1.0, own_view
        assert own_view["opd/xtok/masked_token_frac"] == 0.0, own_view
        assert abs(student_view["opd/reverse_kl"]) > 0.1, student_view  # a real teacher: the check is not 0 == 0
        for key in KEYS:
            assert abs(own_view[key] - student_view[key]) < 1e-5, (step, key, own_view[key], student_view[key])


def test_teacher_only_context_trains_against_the_students_own_weights(
    tiny, trained_pair, view_args, main_ppo, tmp_path
):
    """Privileged-context self-distillation: the teacher is the student's own weights plus a hint it alone reads.

    ``opd.teacher.system_prompt`` and ``opd.teacher.context_key=extra_info.answer`` (the tiny task's rows
    carry the answer): the teacher's rendered prompt differs from the student's (logged once), so the
    same weights disagree with themselves and the reverse KL is non-zero; the run trains (two steps).
    """
    student = trained_pair.teacher  # valid, canonical text: every chunk one token
    teacher = tmp_path / "self_teacher"
    shutil.copytree(student, teacher)
    args = view_args(tiny, student, teacher, "own") + [
        "trainer.total_training_steps=2",
        "+opd.teacher.system_prompt=Check the reference answer.",
        "+opd.teacher.context_key=extra_info.answer",
    ]
    run = main_ppo(args, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    shown = [line for line in run.output.splitlines() if "opd.teacher.view=own, first sample" in line]
    assert len(shown) == 1, shown  # one teacher worker, logged once
    assert "Check the reference answer." in shown[0] and "Reference:" in shown[0], shown[0]
    assert sorted(run.steps) == [1, 2], run.tail()
    for step, m in run.steps.items():
        assert m["opd/reverse_kl"] > 1e-3, (step, m)  # same weights, different context: they disagree
        assert m["opd/xtok/one_to_one_chunk_frac"] == 1.0, (step, m)
        assert m["actor/grad_norm"] > 0, (step, m)
