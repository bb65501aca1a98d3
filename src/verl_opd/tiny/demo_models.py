"""The demo's teacher and student: a strong and a weak SFT model for the tiny addition task, built once.

On-policy distillation only shows something if the teacher is good (>= 90% held-out accuracy) and the
student is clearly worse but not hopeless (it knows the ``#### <n>`` format, so OPD has per-token signal to
improve the digits). Both are trained by :func:`verl_opd.tiny.sft.sft_train` from seeded random Qwen2
models that share one byte-identical tokenizer. Everything is cached in ``out_dir`` and keyed by the full
settings, so ``make demo`` rebuilds only when a setting changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from verl_opd.tiny.evaluate import evaluate_accuracy
from verl_opd.tiny.model import build_model
from verl_opd.tiny.sft import SFTExample, sft_train
from verl_opd.tiny.task import build_dataset, load_split, make_problems, prompt_text, solution_text
from verl_opd.tiny.tokenizer import build_tokenizer

# Bump "version" whenever the recipe changes in a way the other settings do not capture.
DEMO_SETTINGS: dict[str, Any] = {
    "version": 1,
    "vocab_size": 512,
    "digits": 2,
    "n_train": 512,
    "n_test": 128,
    "teacher": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "steps": 500, "lr": 3e-3},
    "student": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "steps": 225, "lr": 3e-3},
    "batch_size": 64,
}
RESULT_FILE = "demo_models.json"


def _sft_examples(test_parquet: Path, digits: int, seed: int) -> list[SFTExample]:
    """Every ``digits``-digit addition problem except the held-out test ones, as SFT (prompt, target) pairs."""
    n_values = 10 if digits == 1 else 9 * 10 ** (digits - 1)
    held_out = {messages[0]["content"] for messages in load_split(test_parquet)[0]}
    examples = []
    for question, answer in make_problems(n_values**2, seed=seed, digits=digits):
        if prompt_text(question) not in held_out:
            examples.append(([{"role": "user", "content": prompt_text(question)}], solution_text(question, answer)))
    return examples


def build_demo_models(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Build (or reuse) tokenizer, data, teacher and student under ``out_dir``; return paths and accuracies.

    The returned dict has ``tokenizer``, ``train``, ``test``, ``teacher``, ``student`` (paths as strings),
    ``teacher_accuracy`` and ``student_accuracy`` (greedy, on all of ``test``), the build ``seconds`` of
    each part, the ``settings`` used and ``cached`` (whether everything was reused).
    """
    out = Path(out_dir)
    settings = {**DEMO_SETTINGS, "seed": seed}
    result_path = out / RESULT_FILE
    if result_path.exists():
        stored = json.loads(result_path.read_text())
        if stored["settings"] == settings and all(Path(stored[k]).exists() for k in ("teacher", "student", "test")):
            return {**stored, "cached": True}

    start = time.perf_counter()
    tokenizer = build_tokenizer(out / "tokenizer", vocab_size=settings["vocab_size"], seed=seed)
    train, test = build_dataset(
        out / "data", n_train=settings["n_train"], n_test=settings["n_test"], seed=seed, digits=settings["digits"]
    )
    examples = _sft_examples(test, settings["digits"], seed)
    result: dict[str, Any] = {"tokenizer": str(out / "tokenizer"), "train": str(train), "test": str(test)}
    seconds = {"setup": time.perf_counter() - start}
    for role in ("teacher", "student"):
        cfg = settings[role]
        init = build_model(
            out / f"{role}_init",
            tokenizer,
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_layers"],
            num_heads=cfg["num_heads"],
            num_kv_heads=cfg["num_kv_heads"],
            seed=seed,
        )
        trained = sft_train(
            init, out / role, examples, steps=cfg["steps"], lr=cfg["lr"], batch_size=settings["batch_size"], seed=seed
        )
        eval_start = time.perf_counter()
        result[role] = str(trained.path)
        result[f"{role}_accuracy"] = evaluate_accuracy(trained.path, test)
        seconds[role] = trained.seconds + time.perf_counter() - eval_start
        print(f"[demo-models] {role}: greedy accuracy {result[f'{role}_accuracy']:.1%} ({seconds[role]:.0f}s)")
    result.update(seconds=seconds, settings=settings)
    result_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return {**result, "cached": False}
