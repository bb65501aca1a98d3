"""Benchmark: one student, two tasks, two teachers in verl's reference slot (issue 13, ``opd.teachers``).

Tasks (:mod:`verl_opd.tiny.task`): 2-digit addition (``data_source=openai/gsm8k``) and 2-digit subtraction with
the larger operand first (``data_source=lighteval/MATH``; only a routing key here: verl's MATH grader expects
``\\boxed{}``, so its task reward reads 0, and pure OPD does not use it). Both are graded by the tiny kit's
:func:`~verl_opd.tiny.evaluate.evaluate_accuracy` (greedy, verl's strict gsm8k rule ``#### <number>``) on each
task's 128 held-out problems.

Models (built once, with ``--model-seed``, cached in ``--workdir``; every one shares the demo's tokenizer):

* ``add`` teacher: the demo's addition teacher (:func:`verl_opd.tiny.demo_models.build_demo_models`);
* ``sub`` teacher: that teacher SFT'd on subtraction only (it then answers none of the held-out additions);
* ``joint``: the ``sub`` teacher SFT'd on both tasks (correct answers): 71% on addition, 98% on subtraction;
* student: ``joint`` SFT'd on both tasks with the demo's off-by-one habit (70% of answers +1), as the demo's
  ``habit`` student: able to do both, with a mistake on most problems that each task's teacher can point at.

One ``main_ppo`` run per seed (``trainer.device=cpu``, the seed of data order and sampling; the models are the
same): ``+opd.teachers.add`` scores the addition samples, ``+opd.teachers.sub`` the subtraction ones, one PPO
update per step; the last step's student is saved as a Hugging Face model and graded on both tasks. Per seed and
teacher: ``opd/<name>/reverse_kl`` averaged over the first and the last ``--window`` steps, and the median of
``opd/<name>/forward_s`` over steps >= 2. Writes ``benchmarks/results/multi_teacher.{json,md}``. Not a test.

    flock /tmp/e2e.lock nice -n 10 python benchmarks/multi_teacher.py [--seeds 0 1 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from verl_opd.tiny.task import DATA_SOURCE
from verl_opd.tools.console_metrics import parse_step_metrics
from verl_opd.tools.demo import HF_CONTENTS, cpu_run_args
from verl_runs import run_measured  # benchmarks/ is on sys.path when a benchmark is run

RESULTS = Path(__file__).parent / "results"
# teacher name -> (arithmetic operation, data_source it scores)
TASKS = {"add": ("+", DATA_SOURCE), "sub": ("-", "lighteval/MATH")}
# How each non-demo model is SFT'd (steps, lr, warm-up); batch size and the habit are the demo's.
RECIPE: dict[str, Any] = {
    "version": 3,
    "sub_teacher": {"steps": 600, "lr": 3e-3, "warmup_steps": 50},
    "joint": {"steps": 600, "lr": 3e-3, "warmup_steps": 50},
    "student": {"steps": 60, "lr": 1e-3, "warmup_steps": 10},
}


# ---------------------------------------------------------------------------------------------- models
def build_models(out: Path, seed: int) -> dict[str, Any]:
    """The teachers, the student and both tasks' data under ``out`` (rebuilt when ``RECIPE`` or the seed changes)."""
    from verl_opd.tiny.demo_models import DEMO_SETTINGS, build_demo_models, sft_examples
    from verl_opd.tiny.evaluate import evaluate_accuracy
    from verl_opd.tiny.sft import sft_train
    from verl_opd.tiny.task import build_dataset

    record = out / "models.json"
    key = {**RECIPE, "seed": seed}
    if record.exists() and json.loads(record.read_text()).get("key") == key:
        return json.loads(record.read_text())
    demo = build_demo_models(out / "demo", seed=seed)
    digits, batch = DEMO_SETTINGS["digits"], DEMO_SETTINGS["batch_size"]
    habit = DEMO_SETTINGS["students"]["habit"]
    tests = {"add": Path(demo["test"])}
    trains = {"add": Path(demo["train"])}
    op, source = TASKS["sub"]
    trains["sub"], tests["sub"] = build_dataset(
        out / "sub_data", DEMO_SETTINGS["n_train"], DEMO_SETTINGS["n_test"], seed, digits, op, source
    )

    def examples(name: str, shift: dict[str, Any] | None = None) -> list:
        return sft_examples(tests[name], digits, seed, shift=shift, op=TASKS[name][0])

    def sft(start: str | Path, role: str, data: list) -> str:
        return str(sft_train(start, out / role, data, batch_size=batch, seed=seed, **RECIPE[role]).path)

    sub_teacher = sft(demo["teacher"], "sub_teacher", examples("sub"))
    joint = sft(sub_teacher, "joint", examples("add") + examples("sub"))
    student = sft(joint, "student", examples("add", habit) + examples("sub", habit))
    models = {
        "teachers": {"add": demo["teacher"], "sub": sub_teacher},
        "student": student,
        "train": {name: str(path) for name, path in trains.items()},
        "test": {name: str(path) for name, path in tests.items()},
    }
    models["teacher_accuracy"] = {name: evaluate_accuracy(models["teachers"][name], tests[name]) for name in TASKS}
    models["student_accuracy"] = {name: evaluate_accuracy(student, tests[name]) for name in TASKS}
    record.write_text(json.dumps({**models, "key": key}, indent=2) + "\n")
    return models


def mixed_data(models: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Both tasks' train and test rows in one parquet each (verl's loader shuffles by ``data.seed``)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in ("train", "test"):
        frame = pd.concat([pd.read_parquet(models[split][name]) for name in TASKS], ignore_index=True)
        paths.append(out / f"{split}.parquet")
        frame.to_parquet(paths[-1], index=False)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------------- runs
def run_args(models: dict[str, Any], opts: argparse.Namespace, seed: int, out: Path) -> list[str]:
    """``main_ppo`` overrides of one seed: the demo's CPU run, both teachers, no validation, the last step saved."""
    train, test = mixed_data(models, out / "data")
    args = cpu_run_args(
        models["student"],
        train,
        test,
        opts.steps,
        seed,
        prompts=opts.prompts,
        lr=opts.lr,
        checkpoint_dir=out / "checkpoints",
        project="verl-opd-bench",
        experiment="multi_teacher",
    )
    replaced = ("trainer.val_before_train=", "trainer.test_freq=", "trainer.save_freq=")
    args = [a for a in args if not a.startswith(replaced)]
    args += [
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        f"trainer.save_freq={opts.steps}",
        HF_CONTENTS,
        "algorithm.adv_estimator=opd",
        f"+opd.sampler_poll_s={opts.poll_s}",
    ]
    for name, (_, source) in TASKS.items():
        args += [
            f"+opd.teachers.{name}.model_path={models['teachers'][name]}",
            f"+opd.teachers.{name}.data_sources=[{source}]",
        ]
    return args


def teacher_curves(steps: dict[int, dict[str, float]], window: int) -> dict[str, dict[str, Any]]:
    """Per teacher: its reverse KL per step, the mean of the first / last ``window`` steps that logged one, and
    the median of its forward time over steps >= 2 (step 1 pays for warm-up)."""
    curves: dict[str, dict[str, Any]] = {}
    for name in TASKS:
        kl = {s: m[f"opd/{name}/reverse_kl"] for s, m in sorted(steps.items()) if f"opd/{name}/reverse_kl" in m}
        forward = [m[f"opd/{name}/forward_s"] for s, m in steps.items() if s >= 2 and f"opd/{name}/forward_s" in m]
        values = list(kl.values())
        curves[name] = {
            "reverse_kl": kl,
            "kl_first": statistics.mean(values[:window]) if values else None,
            "kl_last": statistics.mean(values[-window:]) if values else None,
            "forward_s_median": statistics.median(forward) if forward else None,
        }
    return curves


def run_seed(models: dict[str, Any], opts: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    """One seed's run: per-teacher curves, and the final student's held-out accuracy on both tasks."""
    from verl_opd.tiny.evaluate import evaluate_accuracy

    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *run_args(models, opts, seed, out)]
    code, output, wall, peak = run_measured(command, out, out / "run.log")
    steps = parse_step_metrics(output)
    final = out / "checkpoints" / f"global_step_{opts.steps}" / "actor" / "huggingface"
    if code != 0 or not final.is_dir():
        tail = "\n".join(output.splitlines()[-25:])
        raise RuntimeError(f"seed {seed}: main_ppo exit code {code}, no {final}; log {out / 'run.log'}\n{tail}")
    return {
        "teachers": teacher_curves(steps, opts.window),
        "accuracy_after": {name: evaluate_accuracy(final, models["test"][name]) for name in TASKS},
        "step_time_median_s": statistics.median(m["timing_s/step"] for s, m in steps.items() if s >= 2),
        "wall_s": wall,
        "peak_rss_gib": peak,
    }


# ---------------------------------------------------------------------------------------------- summary
def summarize(models: dict[str, Any], runs: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task / teacher over seeds: accuracy before and after, first and last KL, forward time, and the verdicts
    (every seed's accuracy rose; every seed's last-steps KL is below its first-steps KL)."""
    summary = {}
    for name in TASKS:
        after = [run["accuracy_after"][name] for run in runs.values()]
        first = [run["teachers"][name]["kl_first"] for run in runs.values()]
        last = [run["teachers"][name]["kl_last"] for run in runs.values()]
        before = models["student_accuracy"][name]
        summary[name] = {
            "teacher_accuracy": models["teacher_accuracy"][name],
            "accuracy_before": before,
            "accuracy_after": after,
            "kl_first": first,
            "kl_last": last,
            "forward_s_median": statistics.median(run["teachers"][name]["forward_s_median"] for run in runs.values()),
            "accuracy_rises": all(a > before for a in after),
            "kl_falls": all(lo < hi for hi, lo in zip(first, last, strict=True)),
        }
    return summary


def _spread(values: list[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def markdown(result: dict[str, Any]) -> str:
    """The results table (mean [min, max] over seeds) and the two verdicts."""
    opts, summary = result["settings"], result["summary"]
    lines = [
        f"# Two tasks, two teachers, one student ({result['date']})",
        "",
        f"Machine: {result['machine']}. One `main_ppo` run per seed {opts['seeds']} (`trainer.device=cpu`, "
        f"{opts['steps']} steps of {opts['prompts']} prompts drawn from both tasks, lr {opts['lr']}); "
        "`+opd.teachers.add` scores the addition samples (`openai/gsm8k`), `+opd.teachers.sub` the subtraction "
        "ones (`lighteval/MATH`). Accuracy: greedy, on each task's 128 held-out problems (tiny kit's grader); "
        f"reverse KL: `opd/<teacher>/reverse_kl`, mean of the first / last {opts['window']} steps; forward: "
        "`opd/<teacher>/forward_s`, median over steps >= 2 and seeds. Values: mean [min, max] over seeds.",
        "",
        "| task (teacher) | teacher accuracy | student before | student after | reverse KL first steps "
        "| reverse KL last steps | teacher forward s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {row['teacher_accuracy']:.3f} | {row['accuracy_before']:.3f} "
            f"| {_spread(row['accuracy_after'])} | {_spread(row['kl_first'], 4)} | {_spread(row['kl_last'], 4)} "
            f"| {row['forward_s_median']:.4f} |"
        )
    lines.append("")
    for name, row in summary.items():
        lines.append(
            f"- {name}: held-out accuracy rises in every seed: {'yes' if row['accuracy_rises'] else 'NO'}; "
            f"its teacher's reverse KL falls in every seed: {'yes' if row['kl_falls'] else 'NO'}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step, from both tasks")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--window", type=int, default=5, help="steps averaged at each end of the KL curves")
    parser.add_argument("--poll-s", type=float, default=0.2)
    parser.add_argument("--workdir", default=".cache/multi_teacher")
    opts = parser.parse_args(argv)
    work = Path(opts.workdir).resolve()
    models = build_models(work, opts.model_seed)
    print(f"[multi_teacher] teachers {models['teacher_accuracy']}, student {models['student_accuracy']}", flush=True)
    runs = {}
    for seed in opts.seeds:
        runs[seed] = run_seed(models, opts, seed, work / f"seed{seed}")
        print(f"[multi_teacher] seed {seed}: {json.dumps(runs[seed]['accuracy_after'])}", flush=True)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1-min load after runs {os.getloadavg()[0]:.1f}",
        "settings": {k: v for k, v in vars(opts).items() if k != "workdir"},
        "recipe": RECIPE,
        "models": {k: models[k] for k in ("teacher_accuracy", "student_accuracy")},
        "runs": runs,
        "summary": summarize(models, runs),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "multi_teacher.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "multi_teacher.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
