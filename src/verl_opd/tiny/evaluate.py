"""Held-out measures of a tiny model: accuracy graded as verl grades rollouts, and exact reverse KL to a teacher.

Grading with verl's own reward function (strict ``#### <number>`` extraction) means the accuracy printed
by the demo and the reward verl logs during OPD measure the same thing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.reward_score import gsm8k

from verl_opd.tiny.sft import render_prompt, sample_completions
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


@torch.no_grad()
def held_out_reverse_kl(
    student_dir: str | Path,
    teacher_dir: str | Path,
    test_parquet: str | Path,
    n: int = 64,
    max_new_tokens: int = 16,
) -> float:
    """Exact reverse KL ``KL(pi_S || pi_T)`` per response token, teacher-forced on fixed held-out sequences.

    The sequences are the first ``n`` held-out prompts followed by the teacher's greedy completion (its EOS
    included), so they do not depend on the student. At each response position the KL is summed over the
    whole vocabulary, ``sum_v pi_S(v) (log pi_S(v) - log pi_T(v))``, and the result is its mean over all
    response positions. Nothing is sampled: for given weights the number is fixed, which makes it the
    low-variance measure of distillation progress that a test can compare before and after training (the
    per-token k1 sample OPD logs during training is unbiased but noisy).
    """
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, padding_side="left")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    prompts, _ = load_split(test_parquet, n)
    texts = [render_prompt(tokenizer, messages) for messages in prompts]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = inputs["input_ids"].shape[1]
    sequences = teacher.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Response positions: every generated token up to and including the first EOS (padding after it is out,
    # also when the pad id is the EOS id).
    generated = sequences[:, width:]
    is_eos = generated == tokenizer.eos_token_id
    ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    response_mask = ~ended_before
    attention = torch.cat([inputs["attention_mask"], response_mask.long()], dim=1)
    # The distribution over token t comes from position t-1.
    logits = {
        name: model(input_ids=sequences, attention_mask=attention).logits[:, width - 1 : -1].float()
        for name, model in (("student", student), ("teacher", teacher))
    }
    log_s = torch.log_softmax(logits["student"], dim=-1)
    log_t = torch.log_softmax(logits["teacher"], dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(dim=-1)
    return (kl[response_mask].mean()).item()
