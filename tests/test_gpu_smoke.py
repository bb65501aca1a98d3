"""``benchmarks/gpu_smoke.py``: its ``--dry-run`` composes and validates the GPU run's configs on CPU.

The real run needs a CUDA GPU (see ``benchmarks/GPU_SMOKE.md``); what CI can check is that the configs it
would launch are valid for verl and verl-opd and are the GPU path asked for (bf16 compute with fp32 log-prob
heads, sdpa, FSDP2, the rollout backend, equal samples), and that its summary reads verl's step lines right.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_smoke.py"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # verl's optional engines


@pytest.fixture(scope="module")
def smoke() -> Iterator[ModuleType]:
    """The benchmark script as a module (its sibling modules importable, as when it is run)."""
    benchmarks = str(REPO / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(benchmarks)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python benchmarks/gpu_smoke.py --dry-run --out DIR`` as documented; its JSON."""
    root = tmp_path_factory.mktemp("gpu_smoke")
    command = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(root / "out"), "--workdir", str(root / "work")]
    proc = subprocess.run(command, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((root / "out" / "gpu_smoke_dry_run.json").read_text())


def test_dry_run_validates_the_gpu_path_with_equal_samples(dry_run) -> None:
    assert dry_run["problems"] == []
    opd, grpo = dry_run["settings"]["opd"], dry_run["settings"]["grpo"]
    assert opd["samples_per_step"] == grpo["samples_per_step"] == 64
    assert (opd["prompts_per_step"], opd["rollout_n"], grpo["prompts_per_step"], grpo["rollout_n"]) == (64, 1, 16, 4)
    for run in (opd, grpo):
        assert run["device"] == "cuda" and run["attn_implementation"] == "sdpa"
        assert run["strategy"] == {"actor": "fsdp2", "ref": "fsdp2"}
        assert run["compute_dtype"] == {"actor": "bf16", "ref": "bf16"}
        assert run["rollout"] == dry_run["rollout"] == "hf"  # no vLLM in CI: the hf backend on CUDA
    assert opd["opd_precision"] == "bf16" and opd["fp32_log_prob_head"] and opd["reference_model"]
    assert opd["teacher"] == dry_run["models"]["teacher"]["path"]
    assert not grpo["fp32_log_prob_head"] and not grpo["reference_model"]
    for command in dry_run["commands"].values():
        assert command[:3] == ["python", "-m", "verl.trainer.main_ppo"] and "trainer.device=cuda" in command


def test_dry_run_describes_qwen2_shaped_models_without_writing_weights(dry_run) -> None:
    student, teacher = dry_run["models"]["student"], dry_run["models"]["teacher"]
    assert (student["hidden_size"], student["layers"], student["heads"], student["kv_heads"]) == (896, 24, 14, 2)
    assert (teacher["hidden_size"], teacher["layers"], teacher["heads"], teacher["kv_heads"]) == (1536, 28, 12, 2)
    # Qwen2-0.5B / -1.5B bodies; the 512-token vocabulary leaves out most of their embeddings
    assert 0.35e9 < student["parameters"] < 0.37e9 and 1.30e9 < teacher["parameters"] < 1.32e9
    assert student["vocab_size"] == teacher["vocab_size"] == 512
    assert "512 tokens" in dry_run["tokenizer"] + dry_run["setup"]
    for model in (student, teacher):
        path = Path(model["path"])
        assert (path / "config.json").is_file() and not list(path.glob("*.safetensors"))


def test_check_settings_names_each_departure_from_the_gpu_path(smoke, dry_run) -> None:
    good = dry_run["settings"]
    assert smoke.check_settings(good, "hf") == []
    assert smoke.check_settings(good, "vllm") == ["opd: rollout hf, not vllm", "grpo: rollout hf, not vllm"]
    for method, key, value, expected in [
        ("opd", "attn_implementation", "flash_attention_2", "opd: attention flash_attention_2, not sdpa"),
        ("grpo", "compute_dtype", {"actor": "fp32", "ref": "bf16"}, "grpo: computes in"),
        ("opd", "strategy", {"actor": "fsdp", "ref": "fsdp2"}, "opd: strategies"),
        ("opd", "opd_precision", "fp32", "opd: precision fp32"),
        ("grpo", "samples_per_step", 32, "unequal sampled responses per step"),
        ("grpo", "reference_model", True, "grpo: loads a reference model"),
    ]:
        bad = copy.deepcopy(good)
        bad[method][key] = value
        problems = smoke.check_settings(bad, "hf")
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_summary_means_steps_after_warm_up_and_reads_the_rollout_peak(smoke) -> None:
    def step(seconds: float, gap: float) -> dict[str, float]:
        return {
            "timing_s/step": seconds,
            "timing_s/gen": seconds / 2,
            "perf/throughput": 1000 / seconds,
            "response_length/mean": 100.0,
            "actor/perf/max_memory_allocated_gb": seconds,
            "opd/rollout_vs_train_log_prob_abs_diff_mean": gap,
            "opd/student_log_prob_lowp_frac": 0.0,
        }

    steps = {1: step(40.0, 0.5), 2: step(4.0, 0.01), 3: step(6.0, 0.03)}
    log = "\n".join(
        f"verl-opd hf rollout: peak GPU memory since the last sync {a} GiB allocated, 9.0 GiB reserved"
        for a in ("1.5", "2.25")
    )
    run = smoke.summarize_run(steps, log)
    assert run["stage_time_s"] == {"gen": 2.5, "step": 5.0}  # step 1 (warm-up) left out
    assert run["throughput_tokens_per_s_per_gpu"] == pytest.approx((250 + 1000 / 6) / 2, abs=1e-3)
    assert run["response_tokens_per_s"] == pytest.approx((100 * 64 / 4 + 100 * 64 / 6) / 2, abs=1e-3)
    assert run["rollout_vs_train"] == {"opd/rollout_vs_train_log_prob_abs_diff_mean": 0.02}
    assert run["advantage_resolution"] == {"opd/student_log_prob_lowp_frac": 0.0}
    # a peak is a peak over every step, warm-up included; the hf server's from its log lines
    assert run["peak_memory_gib"]["train_worker_allocated"] == 40.0
    assert run["peak_memory_gib"]["hf_rollout_allocated"] == 2.25


def test_dry_run_refuses_to_write_into_the_results_directory() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--dry-run needs --out DIR" in proc.stderr
