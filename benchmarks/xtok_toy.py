"""Benchmark: the exact cross-tokenizer toy (design note §1 C, §4 T2), with and without the guard and the shaping.

:class:`verl_opd.tiny.xtok_toy.ExactToy`: one distribution P over 120 strings, the teacher a canonical-trie LM
over a Llama-3-like tokenizer (digit groups of <= 3), the student a softmax-per-node trie over every
tokenization by a Qwen-like tokenizer (one token per digit). Everything is an exact sum over the support.

For each seed (P from ``toy_distribution(2 * seed)``, the perturbed start from ``2 * seed + 1``):

* at the optimum (student = the canonical-trie LM of P over its own tokenizer, so P_S = P_T):
  ``E_S mean_c |d_c|`` unshaped and shaped (teacher-side potential), the share of chunks with
  ``|d_c| > 1e-9``, ``max |d_c|``, ``max_y |sum_c d_c|``, and the largest entry of the exact expected
  policy gradient (discount 0 and 1); ``E mean|d|`` against a different teacher for scale;
* exact-gradient training (``--steps`` steps, per-node reach-preconditioned, ``--lr``):
  from the canonical-trie LM of another distribution (no non-canonical mass): TV(P_S, P) after training,
  shaping off/on, discount 0 and 1 (bias C);
  from the same start with 10% of the root's mass opened on the non-canonical split ``[a][b]``: TV and
  non-canonical mass, guard off/on x shaping off/on, discount 0 (bias A).

Writes ``benchmarks/results/xtok_toy.json`` and ``xtok_toy.md``; ``tests/test_xtok_toy.py`` asserts the
same effects on seed 0 with fewer steps.

    python benchmarks/xtok_toy.py [--seeds 0 1 2] [--steps 1500] [--lr 2.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from verl_opd.tiny.xtok_toy import ExactToy, toy_distribution

RESULTS = Path(__file__).resolve().parent / "results"
NONCANONICAL_SHARE = 0.1


def at_optimum(toy: ExactToy, other: torch.Tensor) -> dict[str, float]:
    """Chunk log-ratio and gradient statistics at P_S = P_T (and the mean |d| against another teacher)."""
    optimum = toy.canonical_logits(toy.probs)
    result: dict[str, float] = {"mean_abs_d_other_teacher": toy.mean_abs_chunk_log_ratio(other, shaping=False)}
    for name, shaping in (("unshaped", False), ("shaped", True)):
        d, row = toy.chunk_log_ratios(optimum, shaping)
        sums = torch.zeros(len(toy.leaves), dtype=torch.float64).index_add(0, row, d)
        result |= {
            f"mean_abs_d_{name}": toy.mean_abs_chunk_log_ratio(optimum, shaping),
            f"max_abs_d_{name}": d.abs().max().item(),
            f"nonzero_chunk_share_{name}": (d.abs() > 1e-9).double().mean().item(),
            f"max_abs_sequence_sum_{name}": sums.abs().max().item(),
        }
        for discount in (0.0, 1.0):
            grad = toy.gradient(optimum, guard=True, shaping=shaping, discount=discount)
            result[f"max_abs_gradient_{name}_discount{discount:g}"] = grad.abs().max().item()
    return result


def measure(seed: int, steps: int, lr: float) -> dict:
    """Every number of one seed."""
    toy = ExactToy(toy_distribution(2 * seed))
    start = toy.canonical_logits(toy_distribution(2 * seed + 1))
    opened = toy.open_noncanonical(start, NONCANONICAL_SHARE)
    result: dict = {
        "leaves": len(toy.leaves),
        "chunks": len(toy.chunk_log_ratios(start, shaping=False)[0]),
        "optimum": at_optimum(toy, start),
        "start_tv": toy.string_tv(start),
        "opened_start": {"tv": toy.string_tv(opened), "noncanonical_mass": toy.noncanonical_mass(opened)},
    }
    began = time.perf_counter()
    result["canonical_start"] = {
        f"{'shaped' if shaping else 'unshaped'}_discount{discount:g}": toy.string_tv(
            toy.train(start, steps=steps, lr=lr, guard=True, shaping=shaping, discount=discount)
        )
        for shaping in (False, True)
        for discount in (0.0, 1.0)
    }
    result["noncanonical_start"] = {}
    for guard in (False, True):
        for shaping in (False, True):
            trained = toy.train(opened, steps=steps, lr=lr, guard=guard, shaping=shaping)
            result["noncanonical_start"][f"guard_{'on' if guard else 'off'}_{'shaped' if shaping else 'unshaped'}"] = {
                "tv": toy.string_tv(trained),
                "noncanonical_mass": toy.noncanonical_mass(trained),
            }
    result["train_s"] = time.perf_counter() - began
    return result


def _spread(values: list[float]) -> str:
    """``median [min, max]`` in compact scientific notation."""
    return f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def markdown(results: dict) -> str:
    runs = list(results["seeds"].values())
    opt = [r["optimum"] for r in runs]
    lines = [
        f"Exact cross-tokenizer toy, {results['date']}, {results['machine']}: {len(runs)} seeds, "
        f"{runs[0]['leaves']} student sequences, {results['steps']} exact-gradient steps at lr {results['lr']} "
        "(reach-preconditioned). Values: median [min, max] over seeds.",
        "",
        "### At the optimum (P_S = P_T)",
        "",
        "| quantity | unshaped | shaped (teacher-side Phi) |",
        "|---|---|---|",
    ]
    rows = [
        ("E mean abs d per chunk", "mean_abs_d_{}"),
        ("max abs d", "max_abs_d_{}"),
        ("share of chunks with abs d > 1e-9", "nonzero_chunk_share_{}"),
        ("max over sequences of abs(sum d)", "max_abs_sequence_sum_{}"),
        ("max abs expected gradient, discount 0", "max_abs_gradient_{}_discount0"),
        ("max abs expected gradient, discount 1", "max_abs_gradient_{}_discount1"),
    ]
    for label, key in rows:
        cells = [_spread([o[key.format(name)] for o in opt]) for name in ("unshaped", "shaped")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "For scale, E mean abs d against a different teacher: "
        f"{_spread([o['mean_abs_d_other_teacher'] for o in opt])}.",
        "",
        f"### Fixed point from a canonical perturbed student (start TV {_spread([r['start_tv'] for r in runs])})",
        "",
        "| shaping | TV, discount 0 | TV, discount 1 |",
        "|---|---|---|",
    ]
    for name in ("unshaped", "shaped"):
        cells = [_spread([r["canonical_start"][f"{name}_discount{d}"] for r in runs]) for d in (0, 1)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    opened = [r["opened_start"] for r in runs]
    lines += [
        "",
        f"### Guard: start with {NONCANONICAL_SHARE:.0%} of the root on the non-canonical [a][b] "
        f"(start TV {_spread([o['tv'] for o in opened])}, "
        f"non-canonical mass {_spread([o['noncanonical_mass'] for o in opened])})",
        "",
        "| guard | shaping | TV | non-canonical mass |",
        "|---|---|---|---|",
    ]
    for guard in ("off", "on"):
        for name in ("unshaped", "shaped"):
            cell = [r["noncanonical_start"][f"guard_{guard}_{name}"] for r in runs]
            lines.append(
                f"| {guard} | {name} | {_spread([c['tv'] for c in cell])} "
                f"| {_spread([c['noncanonical_mass'] for c in cell])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args()
    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "steps": args.steps,
        "lr": args.lr,
        "seeds": {str(seed): measure(seed, args.steps, args.lr) for seed in args.seeds},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "xtok_toy.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "xtok_toy.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
