"""``verl-opd demo``: on-policy distillation that visibly works, on a laptop CPU, through verl's real trainer.

1. Builds (or reuses, from ``--workdir``) a tiny tokenizer, the addition dataset, an SFT teacher and a
   student (:func:`verl_opd.tiny.demo_models.build_demo_models`) and prints both accuracies.
2. Runs the stock ``python -m verl.trainer.main_ppo trainer.device=cpu algorithm.adv_estimator=opd`` on
   them as a subprocess, the student in the actor slot and the teacher in verl's reference slot. Its full
   output goes to ``<workdir>/main_ppo.log``; one line per training step is printed here (reverse KL, and
   verl's greedy validation accuracy on the held-out set every ``--test-freq`` steps).
3. Prints a teacher / student-before / student-after table of accuracy and reverse KL, and writes
   ``demo_results.json`` and ``demo_plot.png`` to the workdir. The last step's student is saved as a
   Hugging Face model (``<workdir>/checkpoints/global_step_N/actor/huggingface``); its exact reverse KL
   to the teacher on fixed held-out sequences (:func:`verl_opd.tiny.evaluate.held_out_reverse_kl`) is
   the table's low-variance column.

Students (``--student``, see :mod:`verl_opd.tiny.demo_models`): ``habit`` (default), the teacher with a
learned off-by-one habit, which OPD corrects in a few dozen steps; ``small``, a smaller and weaker SFT
model, whose gap is capability and takes far more samples than a laptop demo affords.

Accuracies of the student come from verl's own validation (``trainer.val_before_train=True`` gives step 0,
``trainer.test_freq`` the later ones; greedy decoding, verl's gsm8k grader). The teacher's comes from
:func:`verl_opd.tiny.evaluate.evaluate_accuracy`: greedy, the same grader, the same held-out set.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from verl_opd.tools.console_metrics import parse_step_metrics

DEFAULT_WORKDIR = Path(".cache") / "verl-opd-demo"
DEFAULT_STEPS = 40
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 3e-4
DEFAULT_TEST_FREQ = 5
DEFAULT_RESPONSE_LENGTH = 16
DEFAULT_N = 1
DEFAULT_WARMUP_STEPS = 0
# One line per student kind of verl_opd.tiny.demo_models (kept here so the CLI imports no torch).
STUDENT_STORY = {
    "habit": "student: the teacher fine-tuned on answers that are off by one 70% of the time: it can add, "
    "but has a bad habit",
    "small": "student: a smaller model (hidden 64 vs 96), briefly SFT'd: it has not learned to add yet",
}
LOG_NAME = "main_ppo.log"
RESULTS_NAME = "demo_results.json"
PLOT_NAME = "demo_plot.png"
KL_KEY = "opd/reverse_kl"
KL_SMOOTHING = 5
VAL_PREFIX = "val-core/"
TABLE_HEADER = f"{'':<16}{'accuracy':>10}{'reverse KL':>12}{'held-out KL':>13}"
# verl saves a Hugging Face copy of the student next to its own checkpoint files when asked to.
HF_CONTENTS = "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"
TABLE_ROWS = ("teacher", "student before", "student after")

Printer = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def cpu_run_args(
    student: str | Path,
    train: str | Path,
    test: str | Path,
    steps: int,
    seed: int,
    prompts: int,
    n: int = DEFAULT_N,
    lr: float = DEFAULT_LR,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    test_freq: int = DEFAULT_TEST_FREQ,
    response_length: int = DEFAULT_RESPONSE_LENGTH,
    checkpoint_dir: str | Path = "checkpoints",
    project: str = "verl-opd-demo",
    experiment: str = "opd",
) -> list[str]:
    """Overrides of a ``main_ppo`` run on CPU over the demo's task, whatever the algorithm.

    One PPO update per step (mini-batch = the whole batch), no KL loss, verl's greedy validation at step 0 and
    every ``test_freq`` steps. The demo and ``benchmarks/opd_vs_rl.py`` both build their runs from this, so
    the methods compared there differ only in the lines each adds.
    """
    samples = prompts * n
    return [
        "trainer.device=cpu",
        f"actor_rollout_ref.model.path={student}",
        f"data.train_files={train}",
        f"data.val_files={test}",
        f"data.train_batch_size={prompts}",
        "data.max_prompt_length=64",
        f"data.max_response_length={response_length}",
        f"data.seed={seed}",
        f"actor_rollout_ref.rollout.n={n}",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={samples}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={samples}",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        f"actor_rollout_ref.actor.optim.lr_warmup_steps={warmup_steps}",
        "actor_rollout_ref.actor.optim.weight_decay=0",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=100000",  # the step count decides; the small train set is revisited
        "trainer.logger=console",
        "trainer.val_before_train=True",
        f"trainer.test_freq={test_freq}",
        "trainer.save_freq=-1",
        f"trainer.default_local_dir={checkpoint_dir}",
        f"trainer.project_name={project}",
        f"trainer.experiment_name={experiment}-seed{seed}",
    ]


def opd_args(teacher: str | Path) -> list[str]:
    """The two lines that turn a stock ``ppo_trainer`` run into OPD against ``teacher`` (in verl's ref slot)."""
    return ["algorithm.adv_estimator=opd", f"+opd.teacher.model_path={teacher}"]


def val_accuracy(metrics: dict[str, float]) -> float | None:
    """verl's core validation metric of a step (mean greedy score over the held-out set), if it has one."""
    keys = sorted(k for k in metrics if k.startswith(VAL_PREFIX) and "/mean@" in k)
    return metrics[keys[0]] if keys else None


def validation_curve(steps: dict[int, dict[str, float]]) -> dict[int, float]:
    """Step -> verl's validation accuracy, for the steps that validated."""
    curve = {s: val_accuracy(m) for s, m in sorted(steps.items())}
    return {s: v for s, v in curve.items() if v is not None}


def _step_line(step: int, steps: int, metrics: dict[str, float], last_time: list[float]) -> str:
    now = time.monotonic()
    parts = [f"step {step:>3}/{steps}"]
    if KL_KEY in metrics:
        parts.append(f"reverse KL {metrics[KL_KEY]:.4f}")
    accuracy = val_accuracy(metrics)
    if accuracy is not None:
        parts.append(f"val accuracy {accuracy:.3f}")
    if "timing_s/step" in metrics:
        parts.append(f"{metrics['timing_s/step']:.1f}s/step")
    elif step > 0:
        parts.append(f"{now - last_time[0]:.1f}s")
    last_time[0] = now
    return "  ".join(parts)


def run_main_ppo(
    args: list[str], cwd: Path, log_path: Path, steps: int, out: Printer = _print
) -> tuple[int, dict[int, dict[str, float]]]:
    """Run verl's ``main_ppo``; stream its output to ``log_path``, print one line per step; (exit code, metrics)."""
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    steps_seen: dict[int, dict[str, float]] = {}
    last_time = [time.monotonic()]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        # Its own session, so an interrupt can stop the whole tree (driver, Ray, workers) it started.
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if "step:" not in line:
                    continue
                for step, metrics in parse_step_metrics(line).items():
                    steps_seen[step] = metrics
                    out(_step_line(step, steps, metrics, last_time))
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
    return proc.returncode, steps_seen


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def summarize(
    models: dict[str, Any], steps: dict[int, dict[str, float]], held_out_kl: dict[str, float] | None = None
) -> dict[str, Any]:
    """The demo's numbers: per-step series and the teacher / student-before / student-after rows.

    ``held_out_kl`` (``before``/``after``) is the exact held-out reverse KL of the student before and after.
    """
    held_out_kl = held_out_kl or {}
    train_steps = sorted(s for s in steps if s > 0 and KL_KEY in steps[s])
    val = validation_curve(steps)
    kl = {s: steps[s][KL_KEY] for s in train_steps}
    last_kl_steps = train_steps[-KL_SMOOTHING:]
    step_times = [steps[s]["timing_s/step"] for s in train_steps[1:] if "timing_s/step" in steps[s]]
    first_val, last_val = (min(val), max(val)) if val else (None, None)
    return {
        "teacher": {"accuracy": models["teacher_accuracy"], "reverse_kl": 0.0, "held_out_kl": 0.0},
        "student_before": {
            "accuracy": val.get(0) if 0 in val else None,
            "accuracy_step": first_val,
            "reverse_kl": kl[train_steps[0]] if train_steps else None,
            "held_out_kl": held_out_kl.get("before"),
        },
        "student_after": {
            "accuracy": val[last_val] if val else None,
            "accuracy_step": last_val,
            # the per-step value is a one-sample-per-token estimate: the table reports the mean of the last steps
            "reverse_kl": sum(kl[s] for s in last_kl_steps) / len(last_kl_steps) if last_kl_steps else None,
            "reverse_kl_steps": last_kl_steps,
            "held_out_kl": held_out_kl.get("after"),
        },
        "student_accuracy_at_build": models["student_accuracy"],
        "val_accuracy": {str(s): v for s, v in val.items()},
        "reverse_kl": {str(s): v for s, v in kl.items()},
        "step_time_s_mean": sum(step_times) / len(step_times) if step_times else None,
    }


def format_table(summary: dict[str, Any]) -> str:
    """Three rows: teacher, student before, student after (accuracy, reverse KL per token)."""

    def cell(value: float | None, width: int) -> str:
        return f"{value:>{width}.3f}" if value is not None else f"{'n/a':>{width}}"

    lines = [TABLE_HEADER]
    for name, key in zip(TABLE_ROWS, ("teacher", "student_before", "student_after"), strict=True):
        row = summary[key]
        lines.append(
            f"{name:<16}{cell(row['accuracy'], 10)}{cell(row['reverse_kl'], 12)}{cell(row.get('held_out_kl'), 13)}"
        )
    kl_steps = summary["student_after"].get("reverse_kl_steps") or []
    if kl_steps:
        lines.append(f"(reverse KL before: step 1; after: mean of steps {kl_steps[0]}-{kl_steps[-1]})")
    lines.append("(held-out KL: exact, per token, teacher-forced on the teacher's greedy held-out answers)")
    return "\n".join(lines)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values: the per-step KL is a one-sample-per-token estimate, noisy."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def write_plot(summary: dict[str, Any], path: Path) -> bool:
    """Validation accuracy and reverse KL against step (PNG); False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    val = {int(s): v for s, v in summary["val_accuracy"].items()}
    ax_acc.plot(list(val), list(val.values()), marker="o", label="student (verl validation, greedy)")
    ax_acc.axhline(summary["teacher"]["accuracy"], color="tab:green", linestyle="--", label="teacher")
    ax_acc.set(xlabel="training step", ylabel="held-out accuracy", ylim=(0, 1.02), title="Accuracy")
    ax_acc.legend(loc="lower right")
    kl = {int(s): v for s, v in summary["reverse_kl"].items()}
    steps, values = list(kl), list(kl.values())
    ax_kl.plot(steps, values, color="tab:red", alpha=0.35, label="per step (sampled-token estimate)")
    ax_kl.plot(steps, moving_average(values, KL_SMOOTHING), color="tab:red", label=f"mean of last {KL_SMOOTHING}")
    ax_kl.set(xlabel="training step", ylabel="nats per token", title="Reverse KL(student || teacher)")
    ax_kl.set_ylim(bottom=min(0.0, *values))
    ax_kl.legend(loc="upper right")
    fig.suptitle("On-policy distillation with verl's main_ppo on CPU (verl-opd demo)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_demo(
    steps: int = DEFAULT_STEPS,
    workdir: str | Path = DEFAULT_WORKDIR,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    test_freq: int = DEFAULT_TEST_FREQ,
    response_length: int = DEFAULT_RESPONSE_LENGTH,
    models_dir: str | Path | None = None,
    n: int = DEFAULT_N,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    student: str = "habit",
    out: Printer = _print,
) -> int:
    """The whole demo; returns a process exit code (0 on success, main_ppo's non-zero code on failure).

    ``models_dir`` (default ``<workdir>/models``) caches teacher, students and data across runs.
    """
    from verl_opd.tiny.demo_models import build_demo_models

    start = time.monotonic()
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out(f"verl-opd demo: workdir {work}")
    out("[1/3] teacher, student and data (built once, then reused; the first build takes a few minutes)")
    models_path = Path(models_dir).resolve() if models_dir is not None else work / "models"
    models = build_demo_models(models_path, seed=seed, student=student)
    build_s = time.monotonic() - start
    out(f"      {'reused' if models.get('cached') else f'built in {build_s:.0f}s'}: {models_path}")
    out(f"      teacher accuracy {models['teacher_accuracy']:.3f}  ({models['teacher']})")
    out(f"      student accuracy {models['student_accuracy']:.3f}  ({models['student']})")
    out(f"      ({STUDENT_STORY[student]})")
    out("      (greedy, held-out problems, graded by verl's gsm8k reward)")

    log_path = work / LOG_NAME
    args = cpu_run_args(
        models["student"],
        models["train"],
        models["test"],
        steps,
        seed,
        prompts=batch_size,
        n=n,
        lr=lr,
        warmup_steps=warmup_steps,
        test_freq=test_freq,
        response_length=response_length,
        checkpoint_dir=work / "checkpoints",
    ) + opd_args(models["teacher"])
    # Keep the last step's student, also as a Hugging Face model, for the held-out KL below (and for the user);
    # a fresh run every time (verl's default resume_mode=auto would resume the previous demo's checkpoint).
    args = [a for a in args if not a.startswith("trainer.save_freq=")] + [
        f"trainer.save_freq={steps}",
        HF_CONTENTS,
        "trainer.resume_mode=disable",
    ]
    out(
        f"[2/3] OPD with verl's main_ppo on CPU: {steps} steps, {batch_size} prompts x {n} samples/step, lr {lr}, "
        f"validation every {test_freq} steps"
    )
    out(f"      full log: {log_path}  (start-up takes 1-2 minutes)")
    train_start = time.monotonic()
    returncode, steps_seen = run_main_ppo(args, work, log_path, steps, out)
    train_s = time.monotonic() - train_start
    if returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-60:]
        out("\n".join(tail))
        out(f"verl-opd demo: main_ppo FAILED with exit code {returncode}; full log: {log_path}")
        return returncode or 1
    if not any(s > 0 for s in steps_seen):
        out(f"verl-opd demo: main_ppo exited 0 but printed no training step; full log: {log_path}")
        return 1

    from verl_opd.tiny.evaluate import held_out_reverse_kl

    final_student = work / "checkpoints" / f"global_step_{steps}" / "actor" / "huggingface"
    held_out_kl = {
        "before": held_out_reverse_kl(models["student"], models["teacher"], models["test"]),
        "after": held_out_reverse_kl(final_student, models["teacher"], models["test"]),
    }
    summary = summarize(models, steps_seen, held_out_kl)
    summary.update(
        settings={
            "steps": steps,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "test_freq": test_freq,
            "response_length": response_length,
            "n": n,
            "warmup_steps": warmup_steps,
            "student": student,
        },
        seconds={"models": round(build_s, 1), "main_ppo": round(train_s, 1), "total": None},
        models={k: models[k] for k in ("teacher", "student", "train", "test")},
        final_student=str(final_student),
        main_ppo_args=args,
        log=str(log_path),
    )
    out("[3/3] result")
    out(format_table(summary))
    plot_path = work / PLOT_NAME
    plotted = write_plot(summary, plot_path)
    summary["seconds"]["total"] = round(time.monotonic() - start, 1)
    results_path = work / RESULTS_NAME
    results_path.write_text(json.dumps(summary, indent=2) + "\n")
    out(f"numbers: {results_path}")
    out(f"plot: {plot_path}" if plotted else "plot: skipped (pip install matplotlib)")
    out(f"log: {log_path}")
    out(f"verl-opd demo: done in {summary['seconds']['total']:.0f}s")
    return 0


def _demo(args: argparse.Namespace) -> int:
    return run_demo(
        steps=args.steps,
        workdir=args.workdir,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        test_freq=args.test_freq,
        response_length=args.response_length,
        models_dir=args.models_dir,
        n=args.n,
        warmup_steps=args.warmup_steps,
        student=args.student,
    )


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``verl-opd demo``: build a teacher and student, run OPD through verl's real main_ppo on CPU, report."""
    p = subparsers.add_parser(
        "demo",
        help="on-policy distillation on CPU with verl's real trainer: tiny teacher/student, accuracy table, plot",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    p.add_argument(
        "--workdir",
        default=str(DEFAULT_WORKDIR),
        help=f"models, log, results and plot go here; models are reused across runs (default {DEFAULT_WORKDIR})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the models, data and run (default 0)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per step")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="student learning rate")
    p.add_argument("--test-freq", type=int, default=DEFAULT_TEST_FREQ, help="validate every N steps")
    p.add_argument("--response-length", type=int, default=DEFAULT_RESPONSE_LENGTH, help="max response tokens")
    p.add_argument(
        "--student",
        choices=tuple(STUDENT_STORY),
        default="habit",
        help="habit: the teacher with a learned off-by-one habit (default); small: a smaller, weaker SFT model",
    )
    p.add_argument("--n", type=int, default=DEFAULT_N, help="samples per prompt")
    p.add_argument("--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS, help="linear lr warm-up steps")
    p.add_argument("--models-dir", default=None, help="cache of teacher, student and data (default <workdir>/models)")
    p.set_defaults(func=_demo)
