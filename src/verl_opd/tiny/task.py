"""A tiny arithmetic task in verl's gsm8k parquet schema, graded by verl's own gsm8k reward.

Reusing ``data_source="openai/gsm8k"`` means verl's default reward manager scores rollouts with
``verl.utils.reward_score.gsm8k.compute_score`` (strict mode: the last ``#### <number>`` in the response),
so no custom reward function is needed anywhere in the pipeline.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = "Answer with #### and the number."
OPERATIONS = ("+", "-")


def make_problem(rng: random.Random, digits: int = 2, op: str = "+") -> tuple[str, int]:
    """Draw one problem whose operands have exactly ``digits`` digits (0-9 when ``digits == 1``).

    ``op``: ``"+"`` (addition, the default task) or ``"-"`` (subtraction, larger operand first so the answer is
    never negative: a second task for several teachers, graded by the same ``#### <number>`` rule).
    """
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}: use one of {', '.join(OPERATIONS)}")
    low = 0 if digits == 1 else 10 ** (digits - 1)
    high = 10**digits - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", a - b
    return f"What is {a} + {b}?", a + b


def prompt_text(question: str) -> str:
    """The user message: the question plus the answer-format instruction the gsm8k grader relies on."""
    return f"{question} {INSTRUCTION}"


def solution_text(question: str, answer: int) -> str:
    """The target assistant text for SFT: the bare ``#### <answer>`` line verl's strict gsm8k grader accepts.

    ``question`` is part of the signature so the target can depend on the problem (e.g. a worked
    solution); the bare answer keeps responses a handful of tokens long, which keeps CPU rollouts cheap.
    """
    del question
    return f"#### {answer}"


def _row(question: str, answer: int, split: str, index: int, data_source: str) -> dict:
    """One dataset row in the schema of verl's ``examples/data_preprocess/gsm8k.py``."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": prompt_text(question)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(answer)},
        "extra_info": {"split": split, "index": index, "answer": str(answer), "question": question},
    }


def count_problems(digits: int = 2, op: str = "+") -> int:
    """How many distinct ``digits``-digit ``op`` problems exist (``"-"``: the pairs with ``a >= b``)."""
    n_values = 10 if digits == 1 else 9 * 10 ** (digits - 1)
    return n_values**2 if op == "+" else n_values * (n_values + 1) // 2


def make_problems(n: int, seed: int = 0, digits: int = 2, op: str = "+") -> list[tuple[str, int]]:
    """Draw ``n`` distinct problems deterministically; raises if the task has fewer than ``n`` problems."""
    n_distinct = count_problems(digits, op)
    if n > n_distinct:
        raise ValueError(f"only {n_distinct} distinct {digits}-digit {op!r} problems exist, asked for {n}")
    rng = random.Random(seed)
    problems: dict[str, int] = {}
    while len(problems) < n:
        question, answer = make_problem(rng, digits, op)
        problems.setdefault(question, answer)
    return list(problems.items())


def load_split(parquet_path: str | Path, n: int | None = None) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Read the first ``n`` rows (all if ``None``) of a split: chat prompts and their ground-truth strings."""
    df = pd.read_parquet(parquet_path)
    if n is not None:
        df = df.head(n)
    prompts = [[{"role": m["role"], "content": m["content"]} for m in row] for row in df["prompt"]]
    return prompts, [rm["ground_truth"] for rm in df["reward_model"]]


def build_dataset(
    out_dir: str | Path,
    n_train: int = 512,
    n_test: int = 128,
    seed: int = 0,
    digits: int = 2,
    op: str = "+",
    data_source: str = DATA_SOURCE,
) -> tuple[Path, Path]:
    """Write disjoint ``train.parquet`` and ``test.parquet`` to ``out_dir`` and return their paths.

    ``data_source`` is the column verl picks its default reward by (and several teachers route by); any other
    value than :data:`DATA_SOURCE` gets another grader from verl, or none.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = make_problems(n_train + n_test, seed=seed, digits=digits, op=op)
    paths = []
    for split, chunk in (("train", problems[:n_train]), ("test", problems[n_train:])):
        rows = [_row(q, a, split, i, data_source) for i, (q, a) in enumerate(chunk)]
        path = out / f"{split}.parquet"
        pd.DataFrame(rows).to_parquet(path, index=False)
        paths.append(path)
    return paths[0], paths[1]
