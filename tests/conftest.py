"""Shared fixtures: tiny models built offline, and a runner for the real ``verl.trainer.main_ppo``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from verl_opd.tools.console_metrics import parse_step_metrics

E2E_TIMEOUT_S = 900


@dataclass(frozen=True)
class TinyAssets:
    """Paths of one tiny OPD setup (all sharing one tokenizer)."""

    root: Path
    student: Path
    teacher: Path
    student_copy: Path
    data: Path

    @property
    def train(self) -> Path:
        return self.data / "train.parquet"

    @property
    def test(self) -> Path:
        return self.data / "test.parquet"


@dataclass(frozen=True)
class RunResult:
    returncode: int
    output: str
    steps: dict[int, dict[str, float]]

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """Student (hidden 32), a larger teacher (hidden 64) and an exact copy of the student."""
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.task import build_dataset
    from verl_opd.tiny.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(root / "tokenizer", vocab_size=256, seed=0)
    student = build_model(root / "student", tokenizer, hidden_size=32, num_layers=2, seed=1)
    teacher = build_model(root / "teacher", tokenizer, hidden_size=64, num_layers=2, seed=2)
    student_copy = root / "student_copy"
    shutil.copytree(student, student_copy)
    build_dataset(root / "data", n_train=64, n_test=16, seed=0)
    return TinyAssets(root, Path(student), Path(teacher), student_copy, root / "data")


def tiny_cpu_args(
    tiny: TinyAssets, steps: int, batch: int = 4, response_length: int = 16, student: Path | None = None
) -> list[str]:
    """Overrides for a small CPU run of ``main_ppo`` on the tiny assets (no algorithm choice).

    No ``trainer.n_gpus_per_node`` / ``trainer.nnodes``: users leave verl's defaults (8 GPUs, 1 node) and
    add ``trainer.device=cpu``, so every CPU e2e test runs what they type (the CPU defaults then apply).
    """
    return [
        "trainer.device=cpu",
        f"data.train_files={tiny.train}",
        f"data.val_files={tiny.test}",
        f"data.train_batch_size={batch}",
        "data.max_prompt_length=64",
        f"data.max_response_length={response_length}",
        f"actor_rollout_ref.model.path={student or tiny.student}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        f"trainer.total_training_steps={steps}",
        "trainer.logger=console",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.project_name=verl_opd_tests",
        "trainer.experiment_name=e2e",
    ]


def run_main_ppo(
    args: list[str], cwd: Path, config_name: str | None = None, timeout_s: float = E2E_TIMEOUT_S
) -> RunResult:
    """Run ``python -m verl.trainer.main_ppo`` as a user would; return its output and parsed step metrics.

    Raises ``subprocess.TimeoutExpired`` after ``timeout_s`` (the process is killed).
    """
    command = [sys.executable, "-m", "verl.trainer.main_ppo"]
    if config_name:
        command.append(f"--config-name={config_name}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    output = proc.stdout + proc.stderr
    return RunResult(proc.returncode, output, parse_step_metrics(output))


@dataclass(frozen=True)
class TrainedPair:
    """A teacher that knows the task's answer format and a student that only half knows it."""

    teacher: Path
    student: Path


@pytest.fixture(scope="session")
def other_teacher(tiny: TinyAssets) -> Path:
    """A random Llama teacher of "another family": :func:`~verl_opd.tiny.tokenizer.build_other_tokenizer`'s
    tokenizer (Llama-3 digit groups, its own chat template and ``<|eot_id|>``), for ``opd.teacher.view=own``."""
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.tokenizer import build_other_tokenizer

    build_other_tokenizer(tiny.root / "other_tokenizer")
    return build_model(
        tiny.root / "other_teacher",
        tiny.root / "other_tokenizer",
        hidden_size=32,
        num_layers=1,
        seed=3,
        architecture="llama",
    )


@pytest.fixture(scope="session")
def trained_pair(tiny: TinyAssets) -> TrainedPair:
    """SFT both on the arithmetic task (seconds on CPU) so the teacher has opinions on the student's samples.

    Random tiny models are near-uniform: a random teacher has no consistent preference a
    student could learn in a few tens of steps, so a falling reverse KL needs trained models.
    """
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.sft import sft_train
    from verl_opd.tiny.task import make_problems, prompt_text, solution_text

    examples = [
        ([{"role": "user", "content": prompt_text(question)}], solution_text(question, answer))
        for question, answer in make_problems(1024, seed=5)
    ]
    teacher_init = build_model(tiny.root / "teacher_init", tiny.root / "tokenizer", hidden_size=64, seed=2)
    teacher = sft_train(
        teacher_init,
        tiny.root / "teacher_sft",
        examples,
        steps=300,
        lr=3e-3,
        batch_size=32,
        warmup_steps=20,
        log_every=100,
    )
    student = sft_train(
        tiny.student,
        tiny.root / "student_sft",
        examples,
        steps=25,
        lr=3e-3,
        batch_size=32,
        warmup_steps=5,
        log_every=25,
    )
    return TrainedPair(Path(teacher.path), Path(student.path))


@pytest.fixture(scope="session")
def trained_other(tiny: TinyAssets, other_teacher: Path) -> Path:
    """A model of :func:`other_teacher`'s family (its tokenizer and template) SFT'd on the arithmetic task like
    ``trained_pair.teacher``: it writes valid, canonical text in a tokenizer whose merges (digit groups, words)
    give its tokens a boundary lookahead (``opd.teacher.shaping``)."""
    from verl_opd.tiny.sft import sft_train
    from verl_opd.tiny.task import make_problems, prompt_text, solution_text

    examples = [
        ([{"role": "user", "content": prompt_text(question)}], solution_text(question, answer))
        for question, answer in make_problems(1024, seed=5)
    ]
    from verl_opd.tiny.model import build_model

    init = build_model(
        tiny.root / "other_init", other_teacher, hidden_size=64, num_layers=2, seed=4, architecture="llama"
    )
    trained = sft_train(init, tiny.root / "other_sft", examples, steps=300, lr=3e-3, batch_size=32, warmup_steps=20)
    return Path(trained.path)


# The tiny prompts render to 68 tokens: 128 leaves them whole for the teacher's own view (a prompt the rollout
# cut is masked there).
OWN_VIEW_PROMPT_LENGTH = 128


def tiny_view_args(
    tiny: TinyAssets, student: Path, teacher: Path, view: str, steps: int = 1, batch: int = 8
) -> list[str]:
    """:func:`tiny_cpu_args` for an OPD run whose teacher reads ``view`` (``student`` or ``own``), one sample per
    prompt, no checkpoints."""
    return tiny_cpu_args(tiny, steps=steps, batch=batch, student=student) + [
        "algorithm.adv_estimator=opd",
        f"+opd.teacher.model_path={teacher}",
        f"+opd.teacher.view={view}",
        f"data.max_prompt_length={OWN_VIEW_PROMPT_LENGTH}",
        "actor_rollout_ref.rollout.n=1",
        "trainer.save_freq=-1",
    ]


@pytest.fixture(scope="session")
def view_args():
    """``tiny_view_args`` as a fixture."""
    return tiny_view_args


@pytest.fixture(scope="session")
def cpu_args():
    """``tiny_cpu_args`` as a fixture (test modules cannot import conftest in importlib mode)."""
    return tiny_cpu_args


@pytest.fixture(scope="session")
def main_ppo():
    """``run_main_ppo`` as a fixture."""
    return run_main_ppo
