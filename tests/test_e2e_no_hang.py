"""Issue 10 end to end: the ordinary command never hangs; what cannot run is refused before Ray starts.

(That the ordinary CPU command without ``trainer.n_gpus_per_node`` / ``trainer.nnodes`` runs is shown by every
CPU e2e test: ``tiny_cpu_args`` passes neither key; ``test_e2e_opd_cpu.py`` checks the defaults it logs.)

Each run is the real ``python -m verl.trainer.main_ppo``. The refusals must come within a minute
(``timeout_s=60`` kills the process and fails the test otherwise) and name the keys to change.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.e2e

REFUSAL_TIMEOUT_S = 60
RAY_STARTED = "Started a local Ray instance"


def _opd_command(tiny, cpu_args, steps: int) -> list[str]:
    """The ordinary OPD command with ``trainer.device=cpu`` and neither device key (verl's default: 8 GPUs)."""
    return cpu_args(tiny, steps=steps) + [
        "algorithm.adv_estimator=opd",
        f"+opd.teacher.model_path={tiny.teacher}",
        "actor_rollout_ref.rollout.n=1",
        "trainer.save_freq=-1",
    ]


def _refused(run, *expected: str) -> None:
    assert run.returncode != 0, run.tail()
    assert RAY_STARTED not in run.output, run.tail()
    for text in expected:
        assert text in run.output, run.tail()


def test_cpu_run_on_two_nodes_is_refused_before_ray(tiny, cpu_args, main_ppo, tmp_path):
    run = main_ppo(_opd_command(tiny, cpu_args, 1) + ["trainer.nnodes=2"], cwd=tmp_path, timeout_s=REFUSAL_TIMEOUT_S)
    _refused(run, "ResourceError", "trainer.device=cpu runs on one machine", "set trainer.nnodes=1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for more GPUs than a GPU-less machine has")
def test_gpu_run_without_gpus_is_refused_before_ray(tiny, cpu_args, main_ppo, tmp_path):
    """verl's default n_gpus_per_node=8, no trainer.device=cpu, on a machine without GPUs (GRPO)."""
    args = [a for a in cpu_args(tiny, steps=1) if not a.startswith("trainer.device=")]
    args += ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.name=vllm"]
    run = main_ppo(args, cwd=tmp_path, timeout_s=REFUSAL_TIMEOUT_S)
    _refused(run, "ResourceError", "ask for 8 GPU(s)", "this machine shows 0", "trainer.device=cpu")
    assert "trainer.n_gpus_per_node" in run.output


def test_parquet_without_prompt_column_is_refused_before_ray(tiny, cpu_args, main_ppo, tmp_path):
    table = pq.read_table(tiny.train)
    bad = tmp_path / "no_prompt.parquet"
    pq.write_table(table.rename_columns(["question" if c == "prompt" else c for c in table.column_names]), bad)
    args = [a for a in _opd_command(tiny, cpu_args, 1) if not a.startswith("data.train_files=")]
    run = main_ppo([*args, f"data.train_files={bad}"], cwd=tmp_path, timeout_s=REFUSAL_TIMEOUT_S)
    _refused(run, "OPDConfigError", f"data.train_files: '{bad}' has no column 'prompt' (data.prompt_key)")
