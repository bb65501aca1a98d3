"""Benchmark (issue 14): OPD's step time with and without verl's ``old_log_prob`` recompute, against GRPO.

The runs of ``benchmarks/opd_vs_rl.py`` (same student, same samples per step: P prompts x 1 for OPD,
P/4 x 4 for GRPO, the demo's teacher, which has the student's size), short and timed only:

* ``opd``: ``opd.recompute=auto``, which skips the recompute in this one-update-per-step setting;
* ``opd_recompute``: ``opd.recompute=always`` (verl's recompute before every update);
* ``grpo``: verl's GRPO (which recomputes, as verl does by default).

Per method: the median over steps >= 2 and over seeds of verl's ``timing_s/step`` and of each stage's
``timing_s/<stage>``. Seeds run method after method, so slow spells of a shared machine spread over all.
Writes ``benchmarks/results/recompute.{json,md}``. Not a test.

    python benchmarks/recompute.py [--seeds 0 1 2] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from datetime import date
from pathlib import Path
from typing import Any

from opd_vs_rl import GRPO_N, RESULTS, STAGES, run_verl  # benchmarks/ is on sys.path when run

METHODS = {"opd": [], "opd_recompute": ["+opd.recompute=always"], "grpo": []}


def step_times(method: str, models: dict[str, Any], opts: argparse.Namespace, seed: int, out: Path) -> dict:
    """One run's median step and stage times (s), over steps >= 2."""
    out.mkdir(parents=True, exist_ok=True)
    base = "grpo" if method == "grpo" else "opd"
    raw = run_verl(base, models, opts, seed, out, extra=tuple(METHODS[method]))
    if "error" in raw:
        raise RuntimeError(f"{method} seed {seed}: {raw['error']}")
    later = [t for s, t in raw["step_time"].items() if s >= 2]
    return {"step_s": statistics.median(later), "stage_s": raw["stage_time_s"], "log": str(out / "run.log")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--response-length", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/verl-opd-bench-recompute")
    parser.add_argument("--out", default=str(RESULTS))
    opts = parser.parse_args()
    # what opd_vs_rl's run builders read; validation only before training (its accuracy is not the point here)
    opts.lr, opts.warmup_steps, opts.test_freq, opts.poll_s = 3e-4, 0, 10**6, 0.2
    opts.grpo_steps = opts.steps

    from verl_opd.tiny.demo_models import build_demo_models

    work = Path(opts.workdir).resolve()
    models = build_demo_models(work / "models", seed=0, student="habit")
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in opts.seeds:
        for method in METHODS:
            runs[method].append(step_times(method, models, opts, seed, work / "runs" / f"{method}_seed{seed}"))
            print(method, seed, runs[method][-1]["step_s"], flush=True)
    summary = {
        m: {
            "step_s": round(statistics.median(r["step_s"] for r in rs), 3),
            "stage_s": {
                stage: round(statistics.median(r["stage_s"][stage] for r in rs), 3)
                for stage in STAGES
                if all(stage in r["stage_s"] for r in rs)
            },
            "seeds": rs,
        }
        for m, rs in runs.items()
    }
    opd, grpo, recompute = (summary[m]["step_s"] for m in ("opd", "grpo", "opd_recompute"))
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch CPU; 1-min load {os.getloadavg()[0]:.1f}",
        "setup": (
            f"verl-opd demo models (teacher and 'habit' student of the same size), {opts.prompts} sampled responses "
            f"per step (GRPO {opts.prompts // GRPO_N} prompts x {GRPO_N}), responses <= {opts.response_length} "
            f"tokens, {opts.steps} steps, seeds {opts.seeds}, one PPO update per step"
        ),
        "methods": summary,
        "opd_vs_grpo": round(opd / grpo, 3),
        "opd_vs_opd_recompute": round(opd / recompute, 3),
    }
    results = Path(opts.out)
    (results / "recompute.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# OPD step time with and without verl's old_log_prob recompute ({result['date']})",
        "",
        f"Machine: {result['machine']}. {result['setup']}.",
        "",
        "Median s over steps >= 2 and seeds (verl's `timing_s/step` and `timing_s/<stage>`):",
        "",
        "| method | step | " + " | ".join(STAGES) + " |",
        "|---|---|" + "---|" * len(STAGES),
        *(
            f"| {m} | {s['step_s']} | " + " | ".join(str(s["stage_s"].get(stage, "n/a")) for stage in STAGES) + " |"
            for m, s in summary.items()
        ),
        "",
        f"- OPD (recompute skipped) step time vs GRPO: {opd:.3f} s vs {grpo:.3f} s = {opd / grpo:.2f}x -> "
        f"{'met' if opd <= grpo else 'NOT met'} (target <= 1.0x)",
        f"- OPD (recompute skipped) vs OPD with the recompute: {opd:.3f} s vs {recompute:.3f} s = "
        f"{opd / recompute:.2f}x",
        "",
    ]
    (results / "recompute.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
