"""Benchmark: the GPU path in one command, OPD against GRPO on randomly initialised Qwen2 models.

On one CUDA GPU, the real ``python -m verl.trainer.main_ppo`` runs 5 steps of OPD and 5 of GRPO with equal
sampled responses per step (OPD: P prompts x n=1; GRPO: P/4 prompts x n=4). The models are built here,
seeded and randomly initialised, with the shapes of Qwen2-0.5B (student) and Qwen2-1.5B (teacher) and the
tiny kit's one shared tokenizer (:mod:`verl_opd.tiny`). Its vocabulary is 512 tokens, not Qwen's 151,936,
so the embeddings are small and the models hold about 0.36B and 1.31B parameters (the JSON gives the
counts): the transformer bodies are full size, the LM heads and their log-softmax are not.

Both runs: FSDP2 for the student and (OPD) the teacher, ``sdpa`` attention for both (verl's default is
FlashAttention, absent on the target machine), bf16 compute; OPD adds fp32 LM heads for its log-probs
(``opd.precision=bf16``). Rollout: vLLM if ``import vllm`` works, else verl-opd's ``hf`` backend on the
trainer's GPU (:mod:`verl_opd.cpu.rollout`). Every run looks for finished rollouts every
``opd.sampler_poll_s`` (GRPO through ``quick_poll_sampler.py``), so the wait does not differ.

Measured per run, means over steps 2..5 (step 1 is warm-up): verl's ``timing_s/<stage>``, tokens/s
(verl's ``perf/throughput``: prompt + response tokens per second per GPU; and sampled response tokens per
second), peak GPU memory (the training worker's, from verl's ``actor/perf/max_memory_*``; the ``hf``
rollout server's, from its log; the whole GPU's, sampled with ``nvidia-smi``), the rollout-vs-train
log-prob gap, the advantage's resolution (``opd/*_lowp_frac``), and the OPD/GRPO step-time ratio.
Writes ``benchmarks/results/gpu_smoke.{json,md}`` (``--out``). See ``benchmarks/GPU_SMOKE.md``.

``--dry-run`` (CPU, seconds): composes the same two configs with verl's Hydra config, runs verl-opd's driver
checks and verl's ``validate_config`` on them, asserts the settings above, and writes
``<out>/gpu_smoke_dry_run.json``. The models are described, not built: their ``config.json`` and tokenizer
are written and their parameters counted on the ``meta`` device (no 0.5B/1.5B weights on a CI machine).
Not a test.

    python benchmarks/gpu_smoke.py [--out benchmarks/results] [--workdir /tmp/verl-opd-gpu-smoke]
    python benchmarks/gpu_smoke.py --dry-run --out /tmp/gpu-smoke-dry
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from process_tree import PeakSampler  # benchmarks/ is on sys.path when this file is run
from quick_poll_sampler import quick_poll_overrides
from verl_opd.config.opd_config import ATTN_KEY, OPDConfig
from verl_opd.cpu import ROLLOUT_NAME
from verl_opd.tools.console_metrics import parse_step_metrics
from verl_opd.tools.demo import opd_args
from verl_runs import STAGES, run_measured

RESULTS = Path(__file__).parent / "results"
METHODS = ("opd", "grpo")
STEPS = 5
SAMPLES = 64  # sampled responses per step, both methods
GRPO_N = 4
PROMPT_LENGTH = 64
RESPONSE_LENGTH = 256
MICRO_BATCH = 16
VOCAB_SIZE = 512  # the tiny kit's tokenizer
# Qwen2-0.5B and Qwen2-1.5B shapes (their config.json), with the tiny vocabulary
ARCHITECTURES = {
    "student": {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "intermediate_size": 4864},
    "teacher": {"hidden_size": 1536, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2, "intermediate_size": 8960},
}
SEEDS = {"tokenizer": 0, "data": 0, "student": 1, "teacher": 2, "run": 0}
RUN_TIMEOUT_S = 1200
PREFLIGHT_TIMEOUT_S = 120
# GPU memory a real run needs free before it starts: both models stored in fp32 with the student's grads and
# AdamW state (~11 GiB), activations, and the rollout: vLLM takes gpu_memory_utilization=0.3 of the GPU.
MIN_FREE_GIB = 40.0
GAP_KEYS = (
    "opd/rollout_vs_train_log_prob_abs_diff_mean",
    "opd/rollout_vs_train_log_prob_abs_diff_max",
    "training/rollout_probs_diff_mean",  # verl's own, in probability space (verl/utils/debug/metrics.py)
    "training/rollout_probs_diff_max",
)
RESOLUTION_KEYS = ("opd/student_log_prob_lowp_frac", "opd/teacher_log_prob_lowp_frac")
# verl's metrics from the training worker's process (student and, with OPD, teacher): torch's peak since that
# process started, read at the end of update_actor (verl/workers/engine_workers.py:219-220).
TRAIN_MEMORY_KEYS = ("actor/perf/max_memory_allocated_gb", "actor/perf/max_memory_reserved_gb")
ROLLOUT_PEAK = re.compile(r"verl-opd hf rollout: peak GPU memory since the last sync (\S+) GiB allocated, (\S+) GiB")


# ---------------------------------------------------------------------------------------------- setup
def rollout_backend() -> str:
    """vLLM when it imports, else verl-opd's ``hf`` backend (which serves on the GPU with verl's CUDA platform)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return ROLLOUT_NAME
    return "vllm"


def describe_model(path: Path) -> dict[str, Any]:
    """Parameter count and shape of the model whose ``config.json`` is in ``path`` (built on ``meta``: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    return {
        "path": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding_parameters": embedding,
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }


def write_described_model(out: Path, tokenizer_dir: Path, architecture: dict[str, int]) -> Path:
    """The dry run's model: :func:`verl_opd.tiny.model.build_model`'s ``config.json`` and tokenizer, no weights.

    A ``model.safetensors.index.json`` names every tensor the real build writes (listed from a ``meta``
    build), so verl-opd's weight check sees a model directory; its ``metadata`` says no weights were written.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from verl_opd.tiny.model import model_config
    from verl_opd.tiny.tokenizer import copy_tokenizer

    config = model_config(AutoTokenizer.from_pretrained(tokenizer_dir), **architecture)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    with torch.device("meta"):
        names = Qwen2ForCausalLM(config).state_dict()
    index = {"metadata": {"dry_run": "weights not written"}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return out


def build_assets(root: Path, dry: bool) -> dict[str, Path]:
    """Tokenizer, task data, and the two models (full weights, or :func:`write_described_model` when ``dry``)."""
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.task import build_dataset
    from verl_opd.tiny.tokenizer import build_tokenizer

    tokenizer_dir = root / "tokenizer"
    build_tokenizer(tokenizer_dir, vocab_size=VOCAB_SIZE, seed=SEEDS["tokenizer"])
    train, test = build_dataset(root / "data", n_train=SAMPLES * STEPS, n_test=16, seed=SEEDS["data"])
    assets: dict[str, Path] = {"train": train, "test": test}
    for role, architecture in ARCHITECTURES.items():
        out = root / role
        shutil.rmtree(out, ignore_errors=True)
        if dry:
            assets[role] = write_described_model(out, tokenizer_dir, architecture)
        else:
            assets[role] = build_model(out, tokenizer_dir, seed=SEEDS[role], **architecture)
    return assets


def run_args(method: str, assets: dict[str, Path], rollout: str, checkpoints: Path) -> list[str]:
    """``main_ppo`` overrides of one run on one CUDA GPU; both methods sample :data:`SAMPLES` responses per step."""
    prompts, n = (SAMPLES // GRPO_N, GRPO_N) if method == "grpo" else (SAMPLES, 1)
    args = [
        "trainer.device=cuda",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        f"actor_rollout_ref.model.path={assets['student']}",
        f"data.train_files={assets['train']}",
        f"data.val_files={assets['test']}",
        f"data.train_batch_size={prompts}",
        f"data.max_prompt_length={PROMPT_LENGTH}",
        f"data.max_response_length={RESPONSE_LENGTH}",
        f"data.seed={SEEDS['run']}",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        # verl's model config reads attn_implementation from here (verl/workers/config/model.py:185) and the
        # teacher keeps it (verl_opd.glue.teacher_worker.teacher_model_config)
        f"++{ATTN_KEY}=sdpa",
        f"actor_rollout_ref.rollout.name={rollout}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",  # vLLM's share of the GPU; hf ignores it
        f"actor_rollout_ref.rollout.n={n}",
        f"actor_rollout_ref.rollout.seed={SEEDS['run']}",
        # the rollout's log-probs, for the rollout-vs-train gap (OPD sets it too)
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO_BATCH}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={MICRO_BATCH}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        f"trainer.total_training_steps={STEPS}",
        "trainer.total_epochs=100",
        "trainer.logger=console",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        f"trainer.default_local_dir={checkpoints}",
        "trainer.project_name=verl-opd-gpu-smoke",
        f"trainer.experiment_name={method}",
    ]
    if method == "opd":
        return [*args, *opd_args(assets["teacher"]), "+opd.precision=bf16"]
    return [*args, "algorithm.adv_estimator=grpo", *quick_poll_overrides(OPDConfig().sampler_poll_s)]


# ---------------------------------------------------------------------------------------------- validation
def validated_settings(args: list[str]) -> dict[str, Any]:
    """Compose ``args`` as ``main_ppo`` does, apply and check verl-opd's driver hook and verl's validation.

    Returns the settings that make this the GPU path, as the workers will receive them.
    """
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_opd.glue.driver import configure
    from verl_opd.tools.doctor import compose_opd_config

    config = compose_opd_config(args, "ppo_trainer")
    configure(config, args, check_environment=False)  # no GPU here: the real run checks it (check_gpu)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    arr = config.actor_rollout_ref
    opd = OmegaConf.select(config, "actor_rollout_ref.opd")
    # verl's FSDP engines compute in param_dtype, bf16 when mixed_precision is unset
    # (verl/workers/engine/fsdp/transformer_impl.py:391-397)
    compute = {
        role: (OmegaConf.select(config, f"actor_rollout_ref.{role}.fsdp_config.mixed_precision") or {}).get(
            "param_dtype", "bf16"
        )
        for role in ("actor", "ref")
    }
    return {
        "device": config.trainer.device,
        "adv_estimator": config.algorithm.adv_estimator,
        "samples_per_step": config.data.train_batch_size * arr.rollout.n,
        "prompts_per_step": config.data.train_batch_size,
        "rollout_n": arr.rollout.n,
        "rollout": arr.rollout.name,
        "attn_implementation": OmegaConf.select(config, ATTN_KEY),
        "strategy": {"actor": arr.actor.strategy, "ref": arr.ref.strategy},
        "compute_dtype": compute,
        # OPD's workers install fp32 LM heads whatever opd.precision (verl_opd.glue.precision.FP32HeadWorker)
        "opd_precision": opd.precision if opd is not None else None,
        "fp32_log_prob_head": opd is not None,
        "teacher": opd.teacher.model_path if opd is not None else None,
        "reference_model": need_reference_policy(config),
    }


def check_settings(settings: dict[str, dict[str, Any]], rollout: str) -> list[str]:
    """What is wrong with the validated settings of both runs (empty: they are the GPU path asked for)."""
    problems = []
    for method, s in settings.items():
        if s["device"] != "cuda":
            problems.append(f"{method}: trainer.device={s['device']}, not cuda")
        if s["attn_implementation"] != "sdpa":
            problems.append(f"{method}: attention {s['attn_implementation']}, not sdpa")
        if s["strategy"]["actor"] != "fsdp2" or (method == "opd" and s["strategy"]["ref"] != "fsdp2"):
            problems.append(f"{method}: strategies {s['strategy']}, not fsdp2")
        if s["rollout"] != rollout:
            problems.append(f"{method}: rollout {s['rollout']}, not {rollout}")
        if set(s["compute_dtype"].values()) != {"bf16"}:
            problems.append(f"{method}: computes in {s['compute_dtype']}, not bf16")
    opd = settings["opd"]
    if opd["opd_precision"] != "bf16" or not opd["fp32_log_prob_head"]:
        problems.append(f"opd: precision {opd['opd_precision']}, not bf16 compute with fp32 log-prob heads")
    if not opd["reference_model"] or not opd["teacher"]:
        problems.append("opd: no teacher in the reference slot")
    if settings["grpo"]["reference_model"]:
        problems.append("grpo: loads a reference model; the comparison would charge GRPO a second model")
    samples = {m: s["samples_per_step"] for m, s in settings.items()}
    if len(set(samples.values())) != 1:
        problems.append(f"unequal sampled responses per step: {samples}")
    return problems


# ---------------------------------------------------------------------------------------------- GPU checks
def gpu_report() -> None:
    """Print, as JSON, what this machine's first CUDA device offers (run in a subprocess by :func:`check_gpu`)."""
    import torch

    report: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda}
    report["available"] = torch.cuda.is_available()
    if report["available"]:
        free, total = torch.cuda.mem_get_info(0)
        report.update(
            name=torch.cuda.get_device_name(0),
            bf16=torch.cuda.is_bf16_supported(),
            free_gib=round(free / 2**30, 2),
            total_gib=round(total / 2**30, 2),
            count=torch.cuda.device_count(),
        )
    print(json.dumps(report))


def check_gpu(min_free_gib: float) -> dict[str, Any]:
    """Refuse to start without a usable GPU: CUDA visible, bf16 supported, ``min_free_gib`` free, imports working.

    Asked in a subprocess with a deadline: a wedged driver fails here in :data:`PREFLIGHT_TIMEOUT_S`, not as a
    hung run, and this process keeps no CUDA context (its memory would count against the runs).
    """
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--gpu-report"],
            capture_output=True,
            text=True,
            timeout=PREFLIGHT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SystemExit(
            f"gpu_smoke: asking torch for the GPU did not answer in {PREFLIGHT_TIMEOUT_S} s (driver busy or wedged?)"
        ) from None
    if proc.returncode != 0:
        raise SystemExit(f"gpu_smoke: could not query the GPU:\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["available"]:
        raise SystemExit(
            f"gpu_smoke: no CUDA device (torch {report['torch']}, CUDA build {report['cuda_build']}). This benchmark "
            "needs one GPU; on a CPU machine run `python benchmarks/gpu_smoke.py --dry-run --out DIR`."
        )
    if not report["bf16"]:
        raise SystemExit(f"gpu_smoke: {report['name']} does not support bf16; the GPU path computes in bf16.")
    if report["free_gib"] < min_free_gib:
        raise SystemExit(
            f"gpu_smoke: {report['free_gib']} GiB free on {report['name']} (of {report['total_gib']}); the runs "
            f"need about {min_free_gib} GiB. Stop what else uses the GPU, or lower --min-free-gib at your own risk."
        )
    try:
        import ray  # noqa: F401
        import verl  # noqa: F401

        from verl_opd.glue import plugin
    except ImportError as error:
        raise SystemExit(f"gpu_smoke: {error}; see benchmarks/GPU_SMOKE.md for carrying ray and verl.") from None
    if plugin.LOAD_ERROR:
        raise SystemExit(f"gpu_smoke: verl-opd's plugin failed to load:\n{plugin.LOAD_ERROR}")
    return report


def gpu_used_bytes() -> int:
    """Memory in use on the first GPU, all processes together (``nvidia-smi``; 0 where it cannot answer)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(float(out.strip().splitlines()[0]) * 2**20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------------------------------------- summary
def _mean(values: list[float]) -> float | None:
    return round(statistics.mean(values), 4) if values else None


def summarize_run(steps: dict[int, dict[str, float]], output: str) -> dict[str, Any]:
    """One run's numbers from verl's step lines (means over steps >= 2: step 1 is warm-up) and its log."""
    later = [steps[s] for s in sorted(steps) if s >= 2]

    def mean(key: str) -> float | None:
        return _mean([m[key] for m in later if key in m])

    def peak(key: str) -> float | None:
        values = [m[key] for m in steps.values() if key in m]
        return round(max(values), 3) if values else None

    response_rates = [
        m["response_length/mean"] * SAMPLES / m["timing_s/step"]
        for m in later
        if {"response_length/mean", "timing_s/step"} <= m.keys()
    ]
    rollout_peaks = [float(a) for a, _ in ROLLOUT_PEAK.findall(output)]
    return {
        "steps": sorted(steps),
        "stage_time_s": {
            stage: mean(f"timing_s/{stage}") for stage in (*STAGES, "step") if mean(f"timing_s/{stage}") is not None
        },
        "throughput_tokens_per_s_per_gpu": mean("perf/throughput"),
        "response_tokens_per_s": _mean(response_rates),
        "response_length_mean": mean("response_length/mean"),
        "peak_memory_gib": {
            "train_worker_allocated": peak(TRAIN_MEMORY_KEYS[0]),
            "train_worker_reserved": peak(TRAIN_MEMORY_KEYS[1]),
            "hf_rollout_allocated": round(max(rollout_peaks), 3) if rollout_peaks else None,
        },
        "rollout_vs_train": {key: mean(key) for key in GAP_KEYS if mean(key) is not None},
        "advantage_resolution": {key: mean(key) for key in RESOLUTION_KEYS if mean(key) is not None},
    }


def write_markdown(result: dict[str, Any], path: Path) -> str:
    """The JSON's numbers as one table per quantity; returns the text written."""
    runs = {m: r for m, r in result["runs"].items() if "error" not in r}

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    stages = (*STAGES, "step")
    lines = [
        f"GPU smoke run, {result['date']}, {result['device']['name']} (rollout: {result['rollout']}). "
        f"{result['setup']}",
        "",
        "Step time per stage (s, mean of steps 2..5):",
        "",
        "| run | " + " | ".join(stages) + " | response tokens/s | tokens/s/GPU (verl) |",
        "|---|" + "---|" * (len(stages) + 2),
    ]
    for name, r in runs.items():
        times = " | ".join(fmt(r["stage_time_s"].get(stage)) for stage in stages)
        rates = f"{fmt(r['response_tokens_per_s'])} | {fmt(r['throughput_tokens_per_s_per_gpu'])}"
        lines.append(f"| {name} | {times} | {rates} |")
    memory_keys = ("train_worker_allocated", "train_worker_reserved", "hf_rollout_allocated", "gpu_used_sampled")
    lines += ["", "Peak GPU memory (GiB):", "", "| run | " + " | ".join(memory_keys) + " |", "|---|" + "---|" * 4]
    lines += [
        f"| {n} | " + " | ".join(fmt(r["peak_memory_gib"].get(k)) for k in memory_keys) + " |" for n, r in runs.items()
    ]
    quality = (*GAP_KEYS, *RESOLUTION_KEYS)
    lines += ["", "Log-prob numerics (mean of steps 2..5):", "", "| metric | " + " | ".join(runs) + " |"]
    lines += ["|---|" + "---|" * len(runs)]
    for key in quality:
        lines.append(
            f"| {key} | "
            + " | ".join(fmt(r["rollout_vs_train"].get(key, r["advantage_resolution"].get(key))) for r in runs.values())
            + " |"
        )
    ratio = result.get("opd_over_grpo_step_time")
    lines += ["", f"OPD / GRPO step time: {fmt(ratio)}"]
    lines += [f"- {m} FAILED: {r['error'].splitlines()[0]}" for m, r in result["runs"].items() if "error" in r]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


# ---------------------------------------------------------------------------------------------- main
def setup_text(assets: dict[str, Any], rollout: str) -> str:
    student, teacher = assets["student"], assets["teacher"]
    return (
        f"Random Qwen2 student ({student['parameters'] / 1e9:.2f}B: Qwen2-0.5B's shape) and teacher "
        f"({teacher['parameters'] / 1e9:.2f}B: Qwen2-1.5B's shape), one tokenizer of {VOCAB_SIZE} tokens (the tiny "
        f"kit's; small embeddings), FSDP2, sdpa, bf16 compute (OPD: fp32 LM heads), rollout {rollout}; "
        f"{STEPS} steps of {SAMPLES} sampled responses each (GRPO {SAMPLES // GRPO_N} prompts x {GRPO_N}), "
        f"responses <= {RESPONSE_LENGTH} tokens."
    )


def main() -> None:
    if sys.argv[1:] == ["--gpu-report"]:
        gpu_report()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="compose and validate the configs on CPU only")
    parser.add_argument(
        "--out", default=None, help="results directory (default benchmarks/results; required with --dry-run)"
    )
    parser.add_argument("--workdir", default="/tmp/verl-opd-gpu-smoke", help="models, data and per-run logs")
    parser.add_argument("--min-free-gib", type=float, default=MIN_FREE_GIB, help="GPU memory the runs need free")
    opts = parser.parse_args()
    if opts.dry_run and opts.out is None:
        parser.error("--dry-run needs --out DIR (a dry run never writes to benchmarks/results)")
    out = Path(opts.out or RESULTS).resolve()
    work = Path(opts.workdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    device = None if opts.dry_run else check_gpu(opts.min_free_gib)
    rollout = rollout_backend()
    assets = build_assets(work / "assets", dry=opts.dry_run)
    args = {m: run_args(m, assets, rollout, work / "checkpoints" / m) for m in METHODS}
    settings = {m: validated_settings(a) for m, a in args.items()}
    problems = check_settings(settings, rollout)
    models = {role: describe_model(assets[role]) for role in ARCHITECTURES}
    common = {
        "date": date.today().isoformat(),
        "rollout": rollout,
        "setup": setup_text(models, rollout),
        "tokenizer": f"verl_opd.tiny build_tokenizer(vocab_size={VOCAB_SIZE}), shared by both models",
        "models": models,
        "settings": settings,
        "commands": {m: ["python", "-m", "verl.trainer.main_ppo", *a] for m, a in args.items()},
    }
    if opts.dry_run:
        (out / "gpu_smoke_dry_run.json").write_text(json.dumps({**common, "problems": problems}, indent=2) + "\n")
        print(json.dumps({"problems": problems, "settings": settings}, indent=2))
        if problems:
            raise SystemExit("gpu_smoke --dry-run: " + "; ".join(problems))
        return
    if problems:
        raise SystemExit("gpu_smoke: the configs are not the GPU path asked for: " + "; ".join(problems))

    runs: dict[str, Any] = {}
    for method in METHODS:
        run_dir = work / "runs" / method
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"{method}: running main_ppo, log {run_dir / 'run.log'}", flush=True)
        command = [sys.executable, "-m", "verl.trainer.main_ppo", *args[method]]
        with PeakSampler(gpu_used_bytes, interval_s=0.5) as gpu:
            code, output, wall, peak_rss = run_measured(command, run_dir, run_dir / "run.log", RUN_TIMEOUT_S)
        steps = parse_step_metrics(output)
        if code != 0 or len(steps) < STEPS:
            tail = "\n".join(output.splitlines()[-30:])
            runs[method] = {
                "error": f"main_ppo exit code {code}, {len(steps)} step lines; {run_dir / 'run.log'}\n{tail}"
            }
            print(runs[method]["error"], flush=True)
            continue
        runs[method] = summarize_run(steps, output)
        runs[method]["peak_memory_gib"]["gpu_used_sampled"] = round(gpu.peak_gib, 3) if gpu.peak_bytes else None
        runs[method].update(wall_s=round(wall, 1), peak_host_rss_gib=round(peak_rss, 2))
    step_times = [runs[m].get("stage_time_s", {}).get("step") for m in METHODS]
    result = {
        **common,
        "device": device,
        "runs": runs,
        "opd_over_grpo_step_time": round(step_times[0] / step_times[1], 3) if all(step_times) else None,
    }
    (out / "gpu_smoke.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_markdown(result, out / "gpu_smoke.md"))
    if any("error" in r for r in runs.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
