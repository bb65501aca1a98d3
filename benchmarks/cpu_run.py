"""Benchmark: start-up time, time per step and peak memory of verl's real trainer on CPU.

Runs ``python -m verl.trainer.main_ppo trainer.device=cpu`` on freshly built tiny
models (GRPO and OPD) and measures, from outside the process tree:

* start-up: wall time from launch to the first step's metrics line;
* step time: median of verl's own ``timing_s/step`` over steps 2..N
  (step 1 includes warm-up). Both runs look for finished rollouts at one interval: OPD's
  trainer by default (``opd.sampler_poll_s``, 0.2 s), GRPO through verl's custom-sampler hook
  (``quick_poll_sampler.py``; verl's own default of 2 s would floor a tiny step);
* peak memory: the largest sum of RSS over the whole process tree (driver, Ray,
  workers, rollout server), sampled every 0.5 s.

Writes ``benchmarks/results/cpu_run.json`` and ``cpu_run.md``. Not a test.

    python benchmarks/cpu_run.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import psutil

from process_tree import PeakTreeRSS  # benchmarks/ is on sys.path when this file is run
from quick_poll_sampler import quick_poll_overrides
from verl_opd.config.opd_config import OPDConfig
from verl_opd.tools.console_metrics import parse_step_metrics

OPD_POLL_S = OPDConfig().sampler_poll_s  # GRPO gets the interval OPD's trainer uses by default

RESULTS = Path(__file__).parent / "results"


def build_assets(root: Path) -> dict[str, Path]:
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.task import build_dataset
    from verl_opd.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(root / "tokenizer", vocab_size=256)
    build_dataset(root / "data", n_train=64, n_test=16)
    return {
        "student": build_model(root / "student", tokenizer, hidden_size=32, seed=1),
        "teacher": build_model(root / "teacher", tokenizer, hidden_size=64, seed=2),
        "data": root / "data",
    }


def common_args(assets: dict[str, Path], steps: int) -> list[str]:
    data = assets["data"]
    return [
        "trainer.device=cpu",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}",
        "data.train_batch_size=8",
        "data.max_prompt_length=64",
        "data.max_response_length=32",
        f"actor_rollout_ref.model.path={assets['student']}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}",
        "trainer.logger=console",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
    ]


def measure(args: list[str], cwd: Path) -> dict[str, float]:
    """Run one ``main_ppo`` and measure it from outside."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "verl.trainer.main_ppo", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, first_step = [], None
    with PeakTreeRSS(proc.pid) as memory:
        for line in proc.stdout:
            lines.append(line)
            if first_step is None and "step:1 -" in line:
                first_step = time.monotonic() - start
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError("main_ppo failed:\n" + "".join(lines[-40:]))
    steps = parse_step_metrics("".join(lines))
    step_times = [steps[s]["timing_s/step"] for s in sorted(steps) if s > 1]
    return {
        "startup_s": round(first_step - steps[1]["timing_s/step"], 1),
        "first_step_s": round(steps[1]["timing_s/step"], 2),
        "step_time_median_s": round(statistics.median(step_times), 3),
        "total_wall_s": round(time.monotonic() - start, 1),
        "peak_rss_gib": round(memory.peak_gib, 2),
        "steps": len(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = build_assets(root)
        base = common_args(assets, args.steps)
        grpo = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=2", *quick_poll_overrides(OPD_POLL_S)]
        runs = {
            "grpo_n2": measure(base + grpo, root),
            "opd_n1": measure(
                base + ["algorithm.adv_estimator=opd", f"+opd.teacher.model_path={assets['teacher']}"], root
            ),
        }
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "setup": "tiny Qwen2 student (hidden 32) / teacher (hidden 64), 8 prompts x 32 response tokens",
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_run.json").write_text(json.dumps(result, indent=2) + "\n")
    header = "| run | start-up (s) | first step (s) | step, median (s) | peak RSS (GiB) |\n|---|---|---|---|---|\n"
    rows = "".join(
        f"| {name} | {r['startup_s']} | {r['first_step_s']} | {r['step_time_median_s']} | {r['peak_rss_gib']} |\n"
        for name, r in runs.items()
    )
    table = f"CPU run of verl's real trainer, {result['date']}, {result['machine']}\n\n{header}{rows}"
    (RESULTS / "cpu_run.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
