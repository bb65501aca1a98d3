"""``opd.precision=bf16`` through verl's real ``main_ppo`` on CPU: bf16 compute, fp32 log-probs (spec rule 10).

torch's CPU backend runs bf16 autocast, so the GPU recipe's precision path (both FSDP engines with
``param_dtype=bf16``, verl-opd's fp32 LM heads) runs here end to end. Without the fp32 heads the log-probs
would be bf16 values (verl's log-softmax of bf16 logits on CPU), which the precision probe reads as 1.0
(benchmarks/precision.py, mode ``bf16_head``: probe 1.000, log-prob errors up to 3e-2 on these models).

Measured (3 runs, 2026-11-25, 2 busy cores): both probes 0.0 at every step; the gap between the ``hf``
rollout's fp32 log-probs and the bf16-body trainer's, ``opd/rollout_vs_train_log_prob_abs_diff_max``,
1.22e-3 .. 1.41e-3 (the benchmark's fp32-head student error: max 1.76e-3). The bound below is 7x that.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_opd_bf16_compute_gives_fp32_log_probs(tiny, cpu_args, main_ppo, tmp_path):
    args = cpu_args(tiny, steps=2) + [
        "algorithm.adv_estimator=opd",
        f"+opd.teacher.model_path={tiny.teacher}",
        "+opd.precision=bf16",
        # the recompute is what this measures: skipped, the opd/* log-probs would be the fp32 rollout's
        "+opd.recompute=always",
        "trainer.save_freq=-1",
    ]
    run = main_ppo(args, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == [1, 2], run.tail()
    assert "actor_rollout_ref.actor.fsdp_config.mixed_precision={'param_dtype': 'bf16'" in run.output
    assert "actor_rollout_ref.ref.fsdp_config.mixed_precision={'param_dtype': 'bf16'" in run.output
    assert "computing in bf16, fp32 LM head" in run.output  # the teacher worker's own report
    for step, m in run.steps.items():
        assert m["opd/student_log_prob_lowp_frac"] < 0.05 and m["opd/teacher_log_prob_lowp_frac"] < 0.05, step
        assert m["opd/advantage_max"] > m["opd/advantage_min"], step
        assert m["opd/rollout_vs_train_log_prob_abs_diff_max"] < 1e-2, step
