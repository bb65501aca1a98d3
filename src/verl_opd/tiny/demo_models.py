"""The demo's teacher and students for the tiny addition task, built once and cached.

On-policy distillation only shows something if the teacher is good (>= 90% held-out accuracy) and the
student is clearly worse but can still be taught in the steps a laptop affords. Every model is trained by
:func:`verl_opd.tiny.sft.sft_train` and shares one byte-identical tokenizer. Two students:

* ``habit`` (the demo's default): the teacher's weights fine-tuned for a few SFT steps on answers that are
  off by one (``a + b + 1``) 70% of the time. It can add but has picked up a systematic bad habit that it
  shows on most problems (17% greedy accuracy): the situation on-policy distillation is made for, a student
  whose own samples carry a mistake the teacher can point at token by token.
* ``small``: a smaller model (hidden 64 vs 96) SFT'd from scratch for fewer steps (16%). Its gap is
  capability, not habit; with single-sample per-token OPD it needs far more samples than a laptop demo
  has (on 2 CPU cores its accuracy stays flat over ~100 OPD steps of 16 prompts).

The ``other`` teacher (``other_teacher=True``) is for ``opd.teacher.view=own``: a teacher of another family,
:func:`verl_opd.tiny.tokenizer.build_other_tokenizer`'s tokenizer (other merges, Llama-3 digit groups, a
Llama-3-like template with a default system prompt and ``<|eot_id|>``) in a Llama model of the teacher's size,
SFT'd by the same recipe on the same problems, rendered in its own template. The demo's students are
unchanged, so the same student can be taught by either teacher.

Each role is cached in ``out_dir`` with a JSON record keyed by every setting it depends on (a student's key
includes its teacher's), so a changed setting rebuilds only what it affects.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from verl_opd.tiny.evaluate import evaluate_accuracy
from verl_opd.tiny.model import build_model
from verl_opd.tiny.sft import SFTExample, sft_train
from verl_opd.tiny.task import build_dataset, count_problems, load_split, make_problems, prompt_text, solution_text
from verl_opd.tiny.tokenizer import build_other_tokenizer, build_tokenizer

# Measured with seed 0 on 2 CPU threads (idle): teacher (96 hidden, 216k params) 94.5% greedy held-out accuracy
# after 500 steps (~55 s); habit student 17.2% (~7 s); small student (64 hidden, 107k params) 16.4% after 225
# steps (~20 s), on the steep part of its curve (10% at 200 steps, 44% at 250).
# Bump "version" whenever the recipe changes in a way the other settings do not capture.
DEMO_SETTINGS: dict[str, Any] = {
    "version": 2,
    "vocab_size": 512,
    "digits": 2,
    "n_train": 512,
    "n_test": 128,
    "batch_size": 64,
    "teacher": {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "steps": 500, "lr": 3e-3},
    "teacher_min_accuracy": 0.9,
    "teacher_extra_rounds": 2,
    # the teacher of another family: its tokenizer's settings (build_other_tokenizer's defaults), the size and
    # recipe of "teacher" but three times the steps. The Llama learns the units digit later: seed 0 was at 6%
    # after 500 steps (tens digit right, units wrong), 22% after 1500, 96.1% after the two extra rounds (~190 s)
    "other_teacher": {"vocab_size": 400, "tokenizer_seed": 1, "architecture": "llama", "steps": 1500},
    "students": {
        "habit": {"wrong_fraction": 0.7, "offset": 1, "steps": 60, "lr": 1e-3, "warmup_steps": 10},
        "small": {
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "steps": 225,
            "lr": 3e-3,
            "warmup_steps": 50,
        },
    },
}
STUDENTS = tuple(DEMO_SETTINGS["students"])
ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads")


def sft_examples(
    test_parquet: Path, digits: int, seed: int, shift: dict[str, Any] | None = None, op: str = "+"
) -> list[SFTExample]:
    """Every ``digits``-digit ``op`` problem except the held-out ones, as SFT (prompt, target) pairs.

    With ``shift`` (``wrong_fraction``, ``offset``), a seeded ``wrong_fraction`` of the answers are off by
    ``offset``: the habit student's training data.
    """
    held_out = {messages[0]["content"] for messages in load_split(test_parquet)[0]}
    rng = random.Random(seed)
    examples = []
    for question, answer in make_problems(count_problems(digits, op), seed=seed, digits=digits, op=op):
        if prompt_text(question) in held_out:
            continue
        if shift is not None and rng.random() < shift["wrong_fraction"]:
            answer += shift["offset"]
        examples.append(([{"role": "user", "content": prompt_text(question)}], solution_text(question, answer)))
    return examples


def _cached(out: Path, role: str, key: dict[str, Any]) -> float | None:
    """The stored accuracy of ``out / role`` if it was built with exactly ``key``."""
    record = out / f"{role}.json"
    if record.exists() and (out / role / "config.json").exists():
        stored = json.loads(record.read_text())
        if stored.get("key") == key:
            return stored["accuracy"]
    return None


def _store(out: Path, role: str, key: dict[str, Any], accuracy: float, seconds: float) -> None:
    record = {"key": key, "accuracy": accuracy, "seconds": round(seconds, 1)}
    (out / f"{role}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _train_teacher(
    out: Path,
    settings: dict[str, Any],
    examples: list[SFTExample],
    test: Path,
    role: str = "teacher",
    tokenizer: str = "tokenizer",
    architecture: str = "qwen2",
    steps: int | None = None,
) -> float:
    """SFT a teacher from a seeded random init into ``out / role``; returns its greedy held-out accuracy.

    The model is an ``architecture`` one with the tokenizer in ``out / tokenizer``, trained for ``steps`` (default:
    the ``teacher`` recipe's). It must clear
    ``teacher_min_accuracy``: small transformers learn the carry abruptly after a seed-dependent plateau, so
    if it has not yet, it gets up to ``teacher_extra_rounds`` more rounds of half the steps at a third of the
    learning rate instead of the demo failing later.
    """
    cfg, seed = settings["teacher"], settings["seed"]
    model_dir = build_model(
        out / f"{role}_init",
        out / tokenizer,
        seed=seed,
        architecture=architecture,
        **{k: cfg[k] for k in ARCH_KEYS},
    )
    first_steps = steps or cfg["steps"]
    steps, lr = first_steps, cfg["lr"]
    for attempt in range(1 + settings["teacher_extra_rounds"]):
        model_dir = sft_train(
            model_dir,
            out / role,
            examples,
            steps=steps,
            lr=lr,
            batch_size=settings["batch_size"],
            seed=seed + attempt,
        ).path
        accuracy = evaluate_accuracy(model_dir, test)  # rendered in the model's own chat template
        print(f"[demo-models] {role}: greedy held-out accuracy {accuracy:.1%}", flush=True)
        if accuracy >= settings["teacher_min_accuracy"]:
            break
        steps, lr = max(1, first_steps // 2), cfg["lr"] / 3
    return accuracy


def _train_student(out: Path, kind: str, settings: dict[str, Any], test: Path) -> float:
    """SFT the ``kind`` student (see the module doc) into ``out / f"student_{kind}"``; its greedy accuracy."""
    cfg, seed, digits = settings["students"][kind], settings["seed"], settings["digits"]
    if kind == "habit":
        start_from = out / "teacher"
        examples = sft_examples(test, digits, seed, shift=cfg)
    else:
        arch = {k: cfg[k] for k in ARCH_KEYS}
        start_from = build_model(out / f"student_{kind}_init", out / "tokenizer", seed=seed, **arch)
        examples = sft_examples(test, digits, seed)
    role = f"student_{kind}"
    path = sft_train(
        start_from,
        out / role,
        examples,
        steps=cfg["steps"],
        lr=cfg["lr"],
        batch_size=settings["batch_size"],
        seed=seed,
        warmup_steps=cfg["warmup_steps"],
    ).path
    accuracy = evaluate_accuracy(path, test)
    print(f"[demo-models] {kind} student: greedy held-out accuracy {accuracy:.1%}", flush=True)
    return accuracy


def _other_teacher(
    out: Path, settings: dict[str, Any], key: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    """Build (or reuse) the teacher of another family in ``out / "other_teacher"`` (the data must exist)."""
    accuracy = _cached(out, "other_teacher", key)
    if accuracy is None:
        start = time.perf_counter()
        cfg, test = settings["other_teacher"], out / "data" / "test.parquet"
        build_other_tokenizer(out / "other_tokenizer", vocab_size=cfg["vocab_size"], seed=cfg["tokenizer_seed"])
        examples = sft_examples(test, settings["digits"], settings["seed"])
        accuracy = _train_teacher(
            out,
            settings,
            examples,
            test,
            "other_teacher",
            "other_tokenizer",
            architecture=cfg["architecture"],
            steps=cfg["steps"],
        )
        seconds["other_teacher"] = time.perf_counter() - start
        _store(out, "other_teacher", key, accuracy, seconds["other_teacher"])
    return {
        "other_tokenizer": str(out / "other_tokenizer"),
        "other_teacher": str(out / "other_teacher"),
        "other_teacher_accuracy": accuracy,
    }


def build_demo_models(
    out_dir: str | Path, seed: int = 0, student: str = "habit", other_teacher: bool = False
) -> dict[str, Any]:
    """Build (or reuse) tokenizer, data, teacher and the ``student`` kind under ``out_dir``.

    Returns ``tokenizer``, ``train``, ``test``, ``teacher``, ``student`` (paths as strings),
    ``teacher_accuracy`` and ``student_accuracy`` (greedy, on all of ``test``), ``student_kind``, the
    wall ``seconds`` spent building now, the ``settings`` used and ``cached`` (whether nothing was built).
    With ``other_teacher``, also the teacher of another family (module doc): ``other_tokenizer``,
    ``other_teacher`` and ``other_teacher_accuracy``.
    """
    if student not in STUDENTS:
        raise ValueError(f"unknown demo student {student!r}: use one of {', '.join(STUDENTS)}")
    out = Path(out_dir)
    settings = {**DEMO_SETTINGS, "seed": seed}
    data_key = {k: settings[k] for k in ("version", "vocab_size", "digits", "n_train", "n_test", "seed")}
    teacher_key = {
        **data_key,
        **{k: settings[k] for k in ("batch_size", "teacher", "teacher_min_accuracy", "teacher_extra_rounds")},
    }
    student_key = {**teacher_key, "student": student, **settings["students"][student]}
    test = out / "data" / "test.parquet"
    result: dict[str, Any] = {
        "tokenizer": str(out / "tokenizer"),
        "train": str(out / "data" / "train.parquet"),
        "test": str(test),
        "teacher": str(out / "teacher"),
        "student": str(out / f"student_{student}"),
        "student_kind": student,
        "settings": settings,
    }
    seconds: dict[str, float] = {}
    teacher_accuracy = _cached(out, "teacher", teacher_key)
    if teacher_accuracy is None:
        start = time.perf_counter()
        build_tokenizer(out / "tokenizer", vocab_size=settings["vocab_size"], seed=seed)
        build_dataset(
            out / "data", n_train=settings["n_train"], n_test=settings["n_test"], seed=seed, digits=settings["digits"]
        )
        teacher_accuracy = _train_teacher(out, settings, sft_examples(test, settings["digits"], seed), test)
        seconds["teacher"] = time.perf_counter() - start
        _store(out, "teacher", teacher_key, teacher_accuracy, seconds["teacher"])
    student_accuracy = _cached(out, f"student_{student}", student_key)
    if student_accuracy is None:
        start = time.perf_counter()
        student_accuracy = _train_student(out, student, settings, test)
        seconds["student"] = time.perf_counter() - start
        _store(out, f"student_{student}", student_key, student_accuracy, seconds["student"])
    if other_teacher:
        result.update(
            _other_teacher(out, settings, {**teacher_key, "other_teacher": settings["other_teacher"]}, seconds)
        )
    return {
        **result,
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy": student_accuracy,
        "seconds": seconds,
        "cached": not seconds,
    }
