"""Benchmark: how far bf16 compute moves OPD's log-probs and advantage from full fp32, with and without the fp32 head.

verl's FSDP engine with ``mixed_precision.param_dtype=bf16`` computes a forward on bf16 copies of the
parameters (FSDP's ``MixedPrecisionPolicy``, verl/workers/engine/fsdp/transformer_impl.py:455-457; buffers
stay fp32, ``buffer_dtype``) under ``torch.autocast(dtype=bf16)`` (transformer_impl.py:1559-1565), then
log-softmaxes ``output.logits`` with ``verl.utils.torch_functional.logprobs_from_logits``. This script
reproduces that numerically on CPU (torch's CPU backend has bf16 autocast) without FSDP, for a student and
a teacher, in four modes:

* ``fp32``: full fp32 (the reference; what ``opd.precision=fp32`` computes);
* ``bf16_head``: bf16 body and verl's default bf16 head, log-softmaxed by verl's function as it runs on CPU
  (``logprobs_from_logits_v2``: bf16 log-softmax for bf16 logits, torch_functional.py:173-200);
* ``bf16_head_fp32_softmax``: the same bf16 logits, log-softmaxed in fp32 (what flash-attn's cross-entropy
  kernel does with bf16 logits on a GPU, torch_functional.py:95-102): upcasting cannot undo the rounding;
* ``fp32_head``: bf16 body and verl-opd's fp32 head (:func:`verl_opd.glue.precision.install_fp32_head`), i.e.
  ``opd.precision=bf16``.

For each mode and each model pair: mean / max / p99 |log-prob - fp32 log-prob| over response tokens, the
same for the per-token advantage ``log pi_T - log pi_S``, the precision probe
(:func:`verl_opd.core.metrics.low_precision_grid_fraction`), and the smallest nonzero |log pi_T - log pi_S|.
Two pairs: the tests' random tiny models (near-uniform logits) and the demo's SFT'd teacher and ``habit``
student (confident logits of realistic magnitude) on addition problems, half with the right answer and
half off by one (the student's habit), so both models see tokens they like and tokens they do not.

Writes ``benchmarks/results/precision.json`` and ``precision.md``. Not a test (tests/test_precision.py
asserts the bounds measured here on the random pair).

    python benchmarks/precision.py [--models .cache/verl-opd-demo/models]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from verl.utils.torch_functional import logprobs_from_logits

from verl_opd.core.metrics import low_precision_grid_fraction
from verl_opd.glue.precision import install_fp32_head
from verl_opd.tiny.sft import collate, encode_example
from verl_opd.tiny.task import make_problems, prompt_text, solution_text

MODES = ("fp32", "bf16_head", "bf16_head_fp32_softmax", "fp32_head")
RESULTS = Path(__file__).resolve().parent / "results"


def bf16_engine_copy(model: PreTrainedModel, fp32_head: bool) -> PreTrainedModel:
    """What verl's FSDP engine computes with under ``param_dtype=bf16``: bf16 parameters, fp32 buffers."""
    engine_model = copy.deepcopy(model)
    for parameter in engine_model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    if fp32_head:
        install_fp32_head(engine_model)
    return engine_model


def response_log_probs(model: PreTrainedModel, batch: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """Log-probs of the response tokens (``loss_mask``) of ``batch`` under ``model`` in ``mode``, as fp32."""
    if mode != "fp32":
        model = bf16_engine_copy(model, fp32_head=mode == "fp32_head")
    autocast = nullcontext() if mode == "fp32" else torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["input_ids"][:, 1:]
        mask = batch["loss_mask"][:, 1:].bool()
        if mode == "bf16_head_fp32_softmax":
            logits = logits.float()
        log_probs = logprobs_from_logits(logits[mask], labels[mask])
    return log_probs.float()


def addition_batch(tokenizer_dir: str | Path, n: int, seed: int, digits: int = 2) -> dict[str, torch.Tensor]:
    """``n`` addition problems as prompt + solution, every other one with the answer off by one."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = [
        ([{"role": "user", "content": prompt_text(question)}], solution_text(question, answer + i % 2))
        for i, (question, answer) in enumerate(make_problems(n, seed=seed, digits=digits))
    ]
    return collate([encode_example(tokenizer, example) for example in examples], tokenizer.pad_token_id)


def _stats(errors: torch.Tensor) -> dict[str, float]:
    errors = errors.abs().double()
    return {
        "mean": errors.mean().item(),
        "p99": errors.quantile(0.99).item(),
        "max": errors.max().item(),
    }


def measure_pair(student: PreTrainedModel, teacher: PreTrainedModel, batch: dict[str, torch.Tensor]) -> dict:
    """Per mode: log-prob and advantage errors against fp32, the precision probe, the smallest nonzero |adv|."""
    log_probs = {
        mode: {
            role: response_log_probs(model, batch, mode) for role, model in (("student", student), ("teacher", teacher))
        }
        for mode in MODES
    }
    reference = log_probs["fp32"]
    advantage_fp32 = reference["teacher"] - reference["student"]
    everything = torch.ones_like(advantage_fp32, dtype=torch.bool)
    results: dict = {"tokens": advantage_fp32.numel(), "fp32_log_prob_mean": reference["student"].mean().item()}
    for mode, values in log_probs.items():
        advantage = values["teacher"] - values["student"]
        nonzero = advantage.abs()[advantage != 0]
        results[mode] = {
            "student_log_prob_error": _stats(values["student"] - reference["student"]),
            "teacher_log_prob_error": _stats(values["teacher"] - reference["teacher"]),
            "advantage_error": _stats(advantage - advantage_fp32),
            "student_lowp_frac": low_precision_grid_fraction(values["student"], everything),
            "teacher_lowp_frac": low_precision_grid_fraction(values["teacher"], everything),
            "smallest_nonzero_abs_advantage": nonzero.min().item() if nonzero.numel() else 0.0,
        }
    return results


def random_pair(root: Path, seed: int) -> tuple[Path, Path, Path]:
    """The tests' tiny pair (tests/conftest.py ``tiny``): tokenizer, student (hidden 32), teacher (hidden 64)."""
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(root / "tokenizer", vocab_size=256, seed=seed)
    student = build_model(root / "student", tokenizer, hidden_size=32, num_layers=2, seed=1)
    teacher = build_model(root / "teacher", tokenizer, hidden_size=64, num_layers=2, seed=2)
    return root / "tokenizer", student, teacher


def run(pairs: dict[str, tuple[Path, Path, Path]], n: int, seeds: list[int]) -> dict:
    """Measure every pair on ``n`` problems for each input seed."""
    load: Callable[[Path], PreTrainedModel] = lambda path: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        path, dtype=torch.float32
    ).eval()
    return {
        name: {str(seed): measure_pair(load(s), load(t), addition_batch(tok, n, seed)) for seed in seeds}
        for name, (tok, s, t) in pairs.items()
    }


def markdown(results: dict, header: str) -> str:
    lines = [header, ""]
    for pair, by_seed in results["pairs"].items():
        tokens = sum(r["tokens"] for r in by_seed.values())
        lines += [
            f"### {pair} ({len(by_seed)} input seeds, {tokens} response tokens; worst seed shown)",
            "",
            "| mode | student lp err mean / max | teacher lp err mean / max | advantage err mean / p99 / max "
            "| lowp frac S / T | smallest nonzero abs adv |",
            "|---|---|---|---|---|---|",
        ]
        for mode in MODES:
            rows = [r[mode] for r in by_seed.values()]

            def worst(key: str, *stats: str, rows: list = rows) -> str:
                """The worst seed's value of each of ``stats`` of the error ``key``, joined by " / "."""
                return " / ".join(f"{max(r[key][stat] for r in rows):.2e}" for stat in stats)

            lowp = " / ".join(f"{max(r[f'{role}_lowp_frac'] for r in rows):.3f}" for role in ("student", "teacher"))
            smallest = min(r["smallest_nonzero_abs_advantage"] for r in rows)
            lines.append(
                f"| {mode} | {worst('student_log_prob_error', 'mean', 'max')} "
                f"| {worst('teacher_log_prob_error', 'mean', 'max')} "
                f"| {worst('advantage_error', 'mean', 'p99', 'max')} | {lowp} | {smallest:.2e} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=".cache/verl-opd-demo/models", help="demo models (built if absent)")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    from verl_opd.tiny.demo_models import build_demo_models

    torch.manual_seed(0)
    demo = build_demo_models(args.models)
    with tempfile.TemporaryDirectory() as tmp:
        pairs = {
            "random (tests' tiny pair)": random_pair(Path(tmp), seed=0),
            "sft (demo teacher + habit student)": (
                Path(demo["tokenizer"]),
                Path(demo["student"]),
                Path(demo["teacher"]),
            ),
        }
        results = {
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "problems": args.problems,
            "pairs": run(pairs, args.problems, args.seeds),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(results, indent=2) + "\n")
    header = (
        f"Log-prob precision vs full fp32, CPU emulation of verl's bf16 FSDP engine, {results['date']}, "
        f"{results['machine']}.\n\nErrors are |value - fp32 value| over response tokens; the advantage is "
        "log pi_T - log pi_S. lowp frac: share of |log-prob| >= 0.5 lying on the bf16/fp16 grid (~1 = bf16 values).\n\n"
        "Modes: fp32 = full fp32 (opd.precision=fp32); bf16_head = bf16 body and head, verl's log-softmax as on CPU "
        "(bf16); bf16_head_fp32_softmax = the same bf16 logits log-softmaxed in fp32 (flash-attn's cross-entropy on a "
        "GPU); fp32_head = bf16 body + verl-opd's fp32 LM head (opd.precision=bf16)."
    )
    (RESULTS / "precision.md").write_text(markdown(results, header))
    print(markdown(results, header))


if __name__ == "__main__":
    main()
