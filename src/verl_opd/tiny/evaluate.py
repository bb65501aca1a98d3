"""Held-out accuracy of a tiny model, graded exactly as verl grades rollouts (its gsm8k ``compute_score``).

Grading with verl's own reward function (strict ``#### <number>`` extraction) means the accuracy printed
by the demo and the reward verl logs during OPD measure the same thing.
"""

from __future__ import annotations

from pathlib import Path

from verl.utils.reward_score import gsm8k

from verl_opd.tiny.sft import sample_completions
from verl_opd.tiny.task import load_split


def score_completions(completions: list[str], ground_truths: list[str]) -> list[float]:
    """verl's gsm8k score (1.0 correct, 0.0 otherwise) of each completion against its ground truth."""
    return [float(gsm8k.compute_score(c, gt)) for c, gt in zip(completions, ground_truths, strict=True)]


def evaluate_accuracy(
    model_dir: str | Path,
    test_parquet: str | Path,
    n: int | None = None,
    temperature: float = 0.0,
    max_new_tokens: int = 16,
    batch_size: int = 128,
    seed: int = 0,
) -> float:
    """Fraction of the first ``n`` problems of ``test_parquet`` answered correctly (greedy by default)."""
    prompts, ground_truths = load_split(test_parquet, n)
    completions = sample_completions(
        model_dir, prompts, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    scores = score_completions(completions, ground_truths)
    return sum(scores) / len(scores)
