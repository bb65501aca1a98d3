"""Issue 13 end to end: two teachers in the reference slot, each scoring its own data_source, real ``main_ppo``."""

from __future__ import annotations

import pandas as pd
import pytest

pytestmark = pytest.mark.e2e

OTHER_SOURCE = "lighteval/MATH"
STEPS = 2
BIG_KL_COEF = 2.0
# |opd/copy/reverse_kl| at step 1 for the teacher that is a copy of the student: the same weights score the same
# tokens in fp32. Measured 0.0 in 3 runs.
COPY_KL_ABS = 1e-4
# opd/big/reverse_kl at step 1: the random student's one sample of the step under the SFT'd teacher. Measured 5.03,
# 5.42, 5.34 in 3 two-rank runs (4 samples on one rank: 5.62, 5.38, 5.38); 1.0 is far below any of them.
MIN_BIG_KL = 1.0
# The refused resume stops in the driver, before Ray: seconds (test_e2e_no_hang.py's bound).
REFUSAL_TIMEOUT_S = 60
# Two CPU ranks (trainer.n_gpus_per_node=2 gives two gloo FSDP workers), 8 prompts a step: 4 rows per rank.
RANKS, BATCH = 2, 8
PER_RANK = BATCH // RANKS


def _two_source_data(tiny, out):
    """The tiny data with one MATH row in every ``BATCH`` rows, the others gsm8k (two teachers' shares).

    Read in order (``data.shuffle=False``), each step's batch holds one sample of the ``big`` teacher, which only
    one of the two ranks can hold: the other runs ``big`` on padding alone, whatever order the rollout returns
    the samples in.
    """
    out.mkdir()
    for split in ("train", "test"):
        frame = pd.read_parquet(tiny.data / f"{split}.parquet")
        frame["data_source"] = [OTHER_SOURCE if i % BATCH == BATCH - 1 else "openai/gsm8k" for i in range(len(frame))]
        frame.to_parquet(out / f"{split}.parquet", index=False)
    return out


def test_each_sample_is_scored_by_its_own_teacher(tiny, trained_pair, cpu_args, main_ppo, tmp_path):
    """The copy of the student reads KL 0 on its samples, the SFT'd teacher far from 0, each with its kl_coef;
    the checkpoint records both teachers: a resume with the same pair continues from the saved step, one with a
    teacher swapped is refused before Ray starts, and so is a data_source no teacher scores.

    On two ranks, one of which holds no sample of ``big``: it runs ``big`` on padded rows, as many forwards as
    its peer (``TeacherSet``), so the FSDP collectives stay in step and nothing hangs.
    """
    data = _two_source_data(tiny, tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    big = trained_pair.teacher
    args = cpu_args(tiny, steps=STEPS, batch=BATCH) + [
        f"trainer.n_gpus_per_node={RANKS}",
        "data.shuffle=False",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={PER_RANK}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={PER_RANK}",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}",
        "algorithm.adv_estimator=opd",
        "actor_rollout_ref.rollout.n=1",
        f"+opd.teachers.copy.model_path={tiny.student_copy}",
        "+opd.teachers.copy.data_sources=[openai/gsm8k]",
        f"+opd.teachers.big.model_path={big}",
        f"+opd.teachers.big.data_sources=[{OTHER_SOURCE}]",
        f"+opd.teachers.big.kl_coef={BIG_KL_COEF}",
        f"trainer.default_local_dir={ckpt}",
        f"trainer.save_freq={STEPS}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model]",
    ]
    run = main_ppo(args, cwd=tmp_path)
    assert run.returncode == 0, run.tail()
    assert sorted(run.steps) == list(range(1, STEPS + 1)), run.tail()
    padded = [line for line in run.output.splitlines() if "holds no sample of teacher" in line]
    # logged once per worker, by a rank that had no sample of big (only big can be missing from a rank)
    assert padded and all("teacher 'big'" in line for line in padded), padded
    for step, m in run.steps.items():
        print(f"step {step}: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(m.items()) if k.startswith("opd/")))
        assert (m["opd/copy/samples"], m["opd/big/samples"]) == (BATCH - 1, 1), step
        for name in ("copy", "big"):  # a teacher's forward time is logged when it scored samples, and > 0
            assert (m.get(f"opd/{name}/forward_s", 0.0) > 0) == (m[f"opd/{name}/samples"] > 0), (step, name)
    first = run.steps[1]
    assert first["opd/copy/samples"] > 0 and first["opd/big/samples"] > 0
    assert abs(first["opd/copy/reverse_kl"]) < COPY_KL_ABS, first
    assert first["opd/big/reverse_kl"] > MIN_BIG_KL, first
    # discount 0: each token's advantage is its reward, -kl_coef * (log pi_S - log pi_T), with its teacher's coef
    assert first["opd/big/advantage_mean"] == pytest.approx(-BIG_KL_COEF * first["opd/big/reverse_kl"], rel=1e-5)
    assert first["opd/copy/advantage_mean"] == pytest.approx(-first["opd/copy/reverse_kl"], abs=1e-6)
    # the global key is the token-weighted mix of the two teachers' (one batch, two disjoint row sets)
    tokens = first["opd/copy/response_tokens"] + first["opd/big/response_tokens"]
    mixed = (
        first["opd/copy/reverse_kl"] * first["opd/copy/response_tokens"]
        + first["opd/big/reverse_kl"] * first["opd/big/response_tokens"]
    ) / tokens
    assert first["opd/response_tokens"] == tokens and first["opd/reverse_kl"] == pytest.approx(mixed, rel=1e-6)
    assert f"teacher {big} loaded" in run.output and f"teacher {tiny.student_copy} loaded" in run.output

    # Resume with the same teachers: verl continues from the saved step (and saves its last one).
    more = [f"trainer.total_training_steps={STEPS + 1}", "trainer.resume_mode=auto"]
    resumed = main_ppo([*args, *more], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.tail()
    assert sorted(resumed.steps) == [STEPS + 1], resumed.tail()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(STEPS + 1)
    assert resumed.steps[STEPS + 1]["opd/copy/samples"] + resumed.steps[STEPS + 1]["opd/big/samples"] == BATCH
    # With one teacher's weights changed: refused by the driver, before Ray starts, naming the teacher and the fix.
    swapped = [a for a in args if not a.startswith("+opd.teachers.big.model_path=")]
    refused = main_ppo(
        [*swapped, f"+opd.teachers.big.model_path={tiny.teacher}", *more], cwd=tmp_path, timeout_s=REFUSAL_TIMEOUT_S
    )
    assert refused.returncode != 0 and "Started a local Ray instance" not in refused.output, refused.tail()
    assert f"Refusing to resume {ckpt / f'global_step_{STEPS + 1}'}: it was distilled from other teachers" in (
        refused.output
    ), refused.tail()
    assert f"(teacher 'big': {big} (fingerprint" in refused.output and "opd.allow_teacher_change=True" in refused.output
    # A data_source no teacher scores: refused by the driver's scan of the parquet files, before Ray, naming it.
    uncovered = [a for a in args if not a.startswith("+opd.teachers.big.data_sources=")]
    uncovered.append("+opd.teachers.big.data_sources=[code/apps]")
    refused = main_ppo(uncovered, cwd=tmp_path, timeout_s=REFUSAL_TIMEOUT_S)
    assert refused.returncode != 0 and "Started a local Ray instance" not in refused.output, refused.tail()
    assert f"has data_source values ['{OTHER_SOURCE}'] that no teacher scores" in refused.output, refused.tail()
