"""The benchmarks' machinery: memory sampling, and ``opd_vs_rl``'s run configurations and summary arithmetic.

The benchmark itself takes about an hour on 2 cores, so it is not run here. What can be checked cheaply:
every verl-based method composes (Hydra), passes verl-opd's driver hook and verl's own ``validate_config``,
samples the same number of responses per step, and the per-seed / per-method summary and the target
verdicts follow from the curves.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from verl_opd.cpu.settings import CPU_ENV

REPO = Path(__file__).resolve().parents[1]
METHODS = {"opd", "grpo", "sft", "verl_distill", "opd_xtok", "opd_xtok_unshaped"}  # the issues' required keys
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # verl's optional engines


def test_peak_tree_rss_sees_a_grandchild(bench) -> None:
    """The peak counts descendants (Ray workers are grandchildren of main_ppo's driver), not only the root."""
    from process_tree import PeakTreeRSS  # importable while the bench fixture holds benchmarks/ on sys.path

    grandchild = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    proc = subprocess.Popen([sys.executable, "-c", child])
    with PeakTreeRSS(proc.pid, interval_s=0.1) as memory:
        proc.wait()
    assert memory.peak_gib > 0.25


def _load_benchmark(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` as a module (it imports its siblings, e.g. ``process_tree``, as when it is run)."""
    benchmarks = str(REPO / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(benchmarks)


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The ``opd_vs_rl`` benchmark script as a module."""
    yield from _load_benchmark("opd_vs_rl")


@pytest.fixture(scope="module")
def multi_bench() -> Iterator[ModuleType]:
    """The ``multi_teacher`` benchmark script as a module."""
    yield from _load_benchmark("multi_teacher")


def _opts(**changes: object) -> argparse.Namespace:
    base = {"prompts": 16, "response_length": 16, "lr": 3e-4, "warmup_steps": 0, "steps": 40, "grpo_steps": 100}
    return argparse.Namespace(**{**base, "test_freq": 5, "poll_s": 0.3, **changes})


@pytest.mark.parametrize("method", ["opd", "grpo", "verl_distill", "opd_xtok", "opd_xtok_unshaped"])
def test_verl_methods_are_valid_configs_with_equal_samples(
    bench, method, tiny, other_teacher, tmp_path, monkeypatch
) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.import_utils import load_extern_type

    from verl_opd.cpu import register
    from verl_opd.glue.driver import configure
    from verl_opd.tools.doctor import compose_opd_config

    register()  # idempotent; another test module's import order may have left verl without the cpu platform
    for name in CPU_ENV:
        monkeypatch.setenv(name, "unset-by-test")  # configure() exports the CPU platform; restored after
    monkeypatch.chdir(tmp_path)
    models = {role: str(getattr(tiny, role)) for role in ("student", "teacher", "train", "test")}
    models["other_teacher"] = str(other_teacher)
    config = compose_opd_config(bench.verl_args(method, models, _opts(), seed=3, out=tmp_path), "ppo_trainer")
    configure(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))

    arr = config.actor_rollout_ref
    assert config.data.train_batch_size * arr.rollout.n == 16  # the equal-cost rule
    assert config.trainer.total_training_steps == (100 if method == "grpo" else 40)
    assert arr.model.path == str(tiny.student) and arr.actor.optim.lr == pytest.approx(3e-4)
    assert config.data.seed == 3 and arr.rollout.name == "hf"
    if method in ("opd", "opd_xtok", "opd_xtok_unshaped"):
        assert config.algorithm.adv_estimator == "opd" and config.trainer.v1.trainer_mode == "opd"
        assert not config.distillation.enabled and config.opd.sampler_poll_s == 0.3
        # opd_xtok: the teacher of another family, read in its own view (the driver refuses it in the student's)
        teacher, view = (other_teacher, "own") if method != "opd" else (tiny.teacher, None)  # None: default
        assert config.opd.teacher.model_path == str(teacher) and config.opd.teacher.get("view") == view
        # the workers' copy has the shaping resolved: auto is both for a teacher that tokenises differently
        shaping = {"opd": "none", "opd_xtok": "both", "opd_xtok_unshaped": "none"}[method]
        assert arr.opd.teacher.shaping == shaping
    else:  # verl's trainers get the same poll interval through verl's custom-sampler hook, as verl builds it
        sampler = config.trainer.v1.sampler
        buffer = load_extern_type(sampler.custom_sampler.path, sampler.custom_sampler.name)(
            trainer_mode="sync",
            trainer_config={},
            max_off_policy_threshold=sampler.max_off_policy_threshold,
            max_off_policy_strategy=sampler.max_off_policy_strategy,
            sampler_kwargs=sampler.sampler_kwargs,
        )
        assert buffer.poll_interval == 0.3
    if method == "grpo":
        assert config.algorithm.adv_estimator == "grpo" and arr.rollout.n == 4
        assert not config.distillation.enabled and not need_reference_policy(config)
    elif method == "verl_distill":
        loss = config.distillation.distillation_loss
        assert config.distillation.enabled and loss.loss_mode == "k1" and loss.use_policy_gradient
        assert not loss.use_task_rewards
        assert config.distillation.teacher_models.teacher_model.model_path == str(tiny.teacher)


def test_finish_run_reads_the_curve(bench) -> None:
    raw = {
        "accuracy": {0: 0.2, 5: 0.8, 10: 0.9, 15: 0.85},
        "step_time": {1: 9.0, 2: 3.0, 3: 3.2, 4: 2.8},
        "wall_s": 100.0,
        "peak_rss_gib": 5.0,
        "response_tokens_mean": 5.5,
        "stage_time_s": {"gen": 1.0, "ref": 0.2},
    }
    run = bench.finish_run(raw, teacher_accuracy=1.0, seed=7, common_step=5)
    assert run["steps_to_90pct_teacher"] == 10  # first validation at >= 0.9 * teacher
    assert run["train_wall_s_to_90pct_teacher"] == pytest.approx(18.0)  # every step up to 10 that was timed
    assert run["final_accuracy"] == 0.85 and run["final_step"] == 15 and run["accuracy_at_common_step"] == 0.8
    assert run["step_time_s"] == pytest.approx(3.0)  # median without the first (warm-up) step
    assert run["stage_time_s"] == {"gen": 1.0, "ref": 0.2}
    never = bench.finish_run({**raw, "accuracy": {0: 0.2, 5: 0.5}}, 1.0, 7, 5)
    assert never["steps_to_90pct_teacher"] is None and never["train_wall_s_to_90pct_teacher"] is None
    assert bench.finish_run({"error": "boom"}, 1.0, 7, 5) == {"seed": 7, "error": "boom"}


def test_summary_median_counts_misses_and_targets(bench) -> None:
    def run(seed: int, reached: int | None, step_time: float) -> dict:
        return {
            "seed": seed,
            "steps_to_90pct_teacher": reached,
            "train_wall_s_to_90pct_teacher": None if reached is None else 3.0 * reached,
            "final_accuracy": 0.9,
            "final_step": 40,
            "accuracy_at_common_step": 0.9,
            "step_time_s": step_time,
            "peak_rss_gib": 5.0,
            "stage_time_s": {"gen": step_time / 2, "ref": 0.1 * seed},
        }

    opd = bench.summarize_method([run(0, 5, 3.0), run(1, 10, 3.0), run(2, None, 3.0)])
    assert opd["steps_to_90pct_teacher"] == 10 and opd["seeds_reaching_90pct_teacher"] == "2/3"
    assert opd["stage_time_s"] == {"gen": 1.5, "ref": 0.1}  # per stage, the median over seeds
    grpo_misses = bench.summarize_method([run(0, None, 2.5), run(1, None, 2.5), run(2, 60, 2.5)])
    assert grpo_misses["steps_to_90pct_teacher"] is None  # most seeds never reached it

    verdicts = bench.targets({"opd": opd, "grpo": grpo_misses}, grpo_run_steps=100)
    assert "ratio is > 10.0x -> met" in verdicts[0]
    assert "3.000 s vs 2.500 s = 1.20x -> met" in verdicts[1]
    assert "verl_distill has no result" in verdicts[2]
    grpo_reaches = bench.summarize_method([run(0, 20, 2.0), run(1, 30, 2.0), run(2, 40, 2.0)])
    verdicts = bench.targets({"opd": opd, "grpo": grpo_reaches}, grpo_run_steps=100)
    assert verdicts[0].endswith("3.0x -> NOT met") and verdicts[1].endswith("1.50x -> NOT met")
    only_distill = bench.targets({"opd": opd, "verl_distill": grpo_reaches}, grpo_run_steps=100)
    assert only_distill[0].endswith("not measured (a method has no result)")


def test_xtok_rates_targets_and_merge(bench, tmp_path) -> None:
    """opd_xtok's alignment rates are summarized first vs last, judged against issue 12, and merged into a record."""

    def run(seed: int, reached: int | None, noncanonical: list[float]) -> dict:
        curve = {str(step): value for step, value in enumerate(noncanonical, start=1)}
        return {
            "seed": seed,
            "steps_to_90pct_teacher": reached,
            "train_wall_s_to_90pct_teacher": reached,
            "final_accuracy": 0.9,
            "final_step": 40,
            "accuracy_at_common_step": 0.9,
            "step_time_s": 2.0,
            "peak_rss_gib": 5.0,
            "xtok_curves": {"noncanonical_token_frac": curve, "masked_token_frac": curve, "prompt_cut_frac": curve},
        }

    falling = [0.01] * 5 + [0.0] * 5 + [0.002] * 5  # first 5 steps 1%, last 5 steps 0.2%
    xtok = bench.summarize_method([run(0, 15, falling), run(1, 20, falling), run(2, None, falling)])
    rate = {"first": 0.01, "last": 0.002, "mean": pytest.approx(0.004), "max": 0.01, "nonzero_steps": 30}
    assert xtok["xtok"]["noncanonical_token_frac"] == rate
    fast, low = bench.xtok_targets(xtok)
    assert "(median): 20 -> met" in fast and low.endswith("-> met")
    rising = bench.summarize_method([run(0, 30, falling[::-1]), run(1, 30, falling[::-1])])
    slow, up = bench.xtok_targets(rising)
    assert slow.endswith("30 -> NOT met") and up.endswith("last 5 1.00% -> NOT met")
    high = bench.summarize_method([run(0, 10, [0.02] * 15)])
    assert bench.xtok_targets(high)[1].endswith("-> NOT met")  # flat, but above 1%

    recorded = {
        "date": "2026-01-01",
        "settings": {"grpo_steps": 100, "steps": 40, "methods": ["opd"], "merge": False},
        "methods": {"opd": xtok},
    }
    new = {
        "date": "2026-01-02",
        "machine": "m",
        "total_wall_s": 9.0,
        "settings": {"grpo_steps": 100, "steps": 30, "methods": ["opd_xtok"], "merge": True},
        "methods": {"opd_xtok": xtok},
    }
    merged = bench.merge_results(recorded, new)
    assert list(merged["methods"]) == ["opd", "opd_xtok"] and merged["date"] == "2026-01-01"
    assert merged["added_runs"] == [
        {
            "methods": ["opd_xtok"],
            "date": "2026-01-02",
            "machine": "m",
            "settings_changed": {"steps": 30},
            "total_wall_s": 9.0,
        }
    ]
    assert any(t.endswith("(median): 20 -> met") for t in merged["targets"])
    again = bench.merge_results(merged, {**new, "date": "2026-01-03"})  # a re-run replaces the earlier addition
    assert [a["date"] for a in again["added_runs"]] == ["2026-01-03"]
    text = bench.write_markdown(
        {**again, "machine": "m", "setup": "s", "teacher_accuracy": 0.9, "student_accuracy": 0.2}, tmp_path / "r.md"
    )
    assert "| opd_xtok | noncanonical_token_frac | 1.00% | 0.20% | 0.40% | 1.00% | 30 |" in text
    assert "Added 2026-01-03 (m): opd_xtok" in text


def test_readme_shows_the_recorded_opd_vs_rl_table() -> None:
    """The README's table is the one the benchmark last wrote (not a hand-edited or stale copy)."""
    recorded = (REPO / "benchmarks" / "results" / "opd_vs_rl.md").read_text()
    json_result = json.loads((REPO / "benchmarks" / "results" / "opd_vs_rl.json").read_text())
    readme = (REPO / "README.md").read_text()
    rows = [line for line in recorded.splitlines() if line.startswith("| ")]
    assert set(json_result["methods"]) == set(METHODS)
    assert all(any(line.startswith(f"| {name} | ") for line in rows) for name in METHODS)
    for line in rows + [line for line in recorded.splitlines() if line.startswith("- OPD ")]:
        assert line in readme.splitlines(), line
    assert json_result["date"] in readme and f"{json_result['teacher_accuracy']:.3f}" in recorded


def test_multi_teacher_curves_summary_and_table(multi_bench) -> None:
    """Per-teacher KL windows skip steps without the teacher; verdicts need every seed; the table shows both."""
    steps = {
        1: {"opd/add/reverse_kl": 1.0, "opd/add/forward_s": 9.0, "opd/sub/samples": 0.0, "opd/add/samples": 4.0},
        2: {"opd/add/reverse_kl": 0.8, "opd/add/forward_s": 0.2, "opd/sub/reverse_kl": 2.0, "opd/sub/forward_s": 0.1},
        3: {"opd/add/reverse_kl": 0.4, "opd/add/forward_s": 0.4, "opd/sub/reverse_kl": 1.0, "opd/sub/forward_s": 0.3},
    }
    curves = multi_bench.teacher_curves(steps, window=2)
    assert curves["add"]["kl_first"] == pytest.approx(0.9) and curves["add"]["kl_last"] == pytest.approx(0.6)
    assert curves["sub"]["reverse_kl"] == {2: 2.0, 3: 1.0} and curves["sub"]["kl_first"] == 1.5
    # step 1 (warm-up) is left out of the forward time
    assert curves["add"]["forward_s_median"] == pytest.approx(0.3) and curves["sub"]["forward_s_median"] == 0.2

    models = {"teacher_accuracy": {"add": 0.95, "sub": 0.9}, "student_accuracy": {"add": 0.2, "sub": 0.1}}
    other = {**curves, "sub": {**curves["sub"], "kl_first": 1.0, "kl_last": 1.2}}  # one seed's KL rose
    runs = {
        0: {"teachers": curves, "accuracy_after": {"add": 0.8, "sub": 0.5}},
        1: {"teachers": other, "accuracy_after": {"add": 0.7, "sub": 0.05}},  # sub fell below its start
    }
    summary = multi_bench.summarize(models, runs)
    assert summary["add"]["accuracy_rises"] and summary["add"]["kl_falls"]
    assert not summary["sub"]["accuracy_rises"] and not summary["sub"]["kl_falls"]
    assert summary["sub"]["accuracy_after"] == [0.5, 0.05]
    settings = {"seeds": [0, 1], "steps": 3, "prompts": 8, "lr": 1e-4, "window": 2}
    table = multi_bench.markdown({"date": "d", "machine": "m", "settings": settings, "summary": summary})
    assert "| add | 0.950 | 0.200 | 0.750 [0.700, 0.800] | 0.9000 [0.9000, 0.9000] |" in table
    assert "- sub: held-out accuracy rises in every seed: NO; its teacher's reverse KL falls in every seed: NO" in table
