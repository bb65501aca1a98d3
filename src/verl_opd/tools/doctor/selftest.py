"""``selftest``: CPU numerics of the OPD advantage on tiny models built in a temp dir (no Ray, no trainer)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from verl_opd.tools.doctor.report import FAIL, PASS, Check


def permute_token_ids(model_dir: str, out_dir: str, pairs: Sequence[tuple[str, str]] = (("1", "2"), ("a", "e"))) -> str:
    """Copy ``model_dir`` to ``out_dir`` with the ids of each pair of tokens swapped in ``tokenizer.json``.

    The vocabulary keeps its size and its tokens; only which id means which token
    changes: the kind of teacher a vocab-size comparison cannot catch.
    """
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    vocab = data["model"]["vocab"]
    for a, b in pairs:
        vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w") as f:
        json.dump(data, f, ensure_ascii=False)
    return out_dir


def _sample(model: Any, prompt: list[int], max_new: int, eos_id: int, generator: Any) -> tuple[list[int], list[float]]:
    """Sample at temperature 1 (no truncation), recording each token's sampling log-prob."""
    import torch

    ids, tokens, log_probs = list(prompt), [], []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        dist = torch.log_softmax(logits, dim=-1)
        token = int(torch.multinomial(dist.exp(), 1, generator=generator))
        tokens.append(token)
        log_probs.append(float(dist[token]))
        ids.append(token)
        if token == eos_id:
            break
    return tokens, log_probs


def _teacher_forced(model: Any, prompt: list[int], response: list[int]) -> tuple[Any, Any]:
    """Log-probs of ``response`` given ``prompt`` in one forward: token t is scored at position t-1.

    Returns ``(log_probs (R,), full log-softmax rows (R, V))``, float32.
    """
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    rows = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return rows.gather(-1, torch.tensor(response)[:, None])[:, 0], rows


def run_selftest(workdir: str | None = None, n_prompts: int = 4, seed: int = 0) -> list[Check]:
    """CPU numeric check of the OPD advantage on tiny models (no Ray, no verl trainer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from verl_opd.checks.tokenizer_check import compare_tokenizers
    from verl_opd.core.advantage import compute_opd_advantage
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.task import make_problems, prompt_text
    from verl_opd.tiny.tokenizer import build_tokenizer

    hf_logging.disable_progress_bar()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="verl-opd-selftest-", dir=workdir) as tmp:
        tokenizer = build_tokenizer(os.path.join(tmp, "tokenizer"), vocab_size=512, seed=seed)
        student_dir = str(build_model(os.path.join(tmp, "student"), tokenizer, seed=seed))
        teacher_dir = str(
            build_model(os.path.join(tmp, "teacher"), tokenizer, hidden_size=96, num_layers=3, seed=seed + 1)
        )
        copy_dir = shutil.copytree(student_dir, os.path.join(tmp, "student_copy"))
        checks.append(
            Check(
                "selftest",
                "tiny models",
                PASS,
                "tokenizer, student (hidden 64, 2 layers), teacher (hidden 96, 3 layers, other seed), student copy",
            )
        )

        same = compare_tokenizers(student_dir, teacher_dir)
        permuted = compare_tokenizers(student_dir, permute_token_ids(student_dir, os.path.join(tmp, "permuted")))
        ids_check = next(c for c in permuted if c.name == "vocabulary ids")
        ok = all(c.passed for c in same) and not ids_check.passed
        checks.append(
            Check(
                "selftest",
                "tokenizer check",
                PASS if ok else FAIL,
                f"accepts the shared tokenizer ({sum(c.passed for c in same)}/{len(same)}), refuses swapped ids "
                f"({ids_check.detail})",
            )
        )

        tok = AutoTokenizer.from_pretrained(student_dir)
        models = {
            name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in (("student", student_dir), ("copy", copy_dir), ("teacher", teacher_dir))
        }
        generator = torch.Generator().manual_seed(seed)
        prompts, responses, sampled = [], [], []
        for i, (question, _) in enumerate(make_problems(n_prompts, seed=seed)):
            messages = [{"role": "user", "content": prompt_text(question)}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt = tok.encode(text, add_special_tokens=False)
            response, log_probs = _sample(models["student"], prompt, 6 + 3 * i, tok.eos_token_id, generator)
            prompts.append(prompt)
            responses.append(response)
            sampled.append(log_probs)

        # Right-padded (B, T) tensors laid out like verl's response tensors; NaN on padding.
        width = max(len(r) for r in responses)
        mask = torch.zeros(len(responses), width, dtype=torch.bool)
        lp = {name: torch.full((len(responses), width), float("nan")) for name in (*models, "sampled")}
        exact_kl = torch.zeros(len(responses), width)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            n = len(response)
            mask[row, :n] = True
            lp["sampled"][row, :n] = torch.tensor(sampled[row])
            rows = {}
            for name, model in models.items():
                lp[name][row, :n], rows[name] = _teacher_forced(model, prompt, response)
            student_rows, teacher_rows = rows["student"], rows["teacher"]
            exact_kl[row, :n] = (student_rows.exp() * (student_rows - teacher_rows)).sum(-1)
        n_tokens = int(mask.sum())

        gap = (lp["sampled"] - lp["student"])[mask].abs().max().item()
        checks.append(
            Check(
                "selftest",
                "log-prob alignment",
                PASS if gap < 1e-4 else FAIL,
                f"sampling log-probs == one teacher-forced forward scored at position t-1 "
                f"(max |diff| {gap:.1e} over {n_tokens} tokens)",
            )
        )

        advantages, _ = compute_opd_advantage(lp["student"], lp["copy"], mask)
        zero = bool((advantages == 0).all())
        checks.append(
            Check(
                "selftest",
                "teacher == student copy",
                PASS if zero else FAIL,
                f"all {advantages.numel()} advantages exactly 0"
                if zero
                else f"advantages not 0: max |A| {advantages.abs().max().item():.3e}",
            )
        )

        advantages, _ = compute_opd_advantage(lp["student"], lp["teacher"], mask)
        kl = exact_kl[mask].mean().item()
        k1 = (lp["student"] - lp["teacher"])[mask].mean().item()
        checks.append(
            Check(
                "selftest",
                "distinct teacher",
                PASS if kl > 0 else FAIL,
                f"reverse KL {kl:.4f} nats/token (full vocabulary) > 0; k1 sample estimate {k1:.4f}",
            )
        )
        expected = (lp["teacher"] - lp["student"])[mask]
        err = (advantages[mask] - expected).abs().max().item()
        padding_zero = bool((advantages[~mask] == 0).all()) and bool(torch.isfinite(advantages).all())
        positive = advantages[mask & (lp["teacher"] > lp["student"])]
        sign_ok = bool((positive > 0).all())
        ok = err == 0 and padding_zero and sign_ok
        checks.append(
            Check(
                "selftest",
                "advantage = teacher - student",
                PASS if ok else FAIL,
                f"max error {err:.1e} on {n_tokens} response tokens, > 0 where the teacher prefers the token, "
                f"{'0' if padding_zero else 'NOT 0'} on {int((~mask).sum())} padding positions (NaN log-probs there)",
            )
        )
    return checks
