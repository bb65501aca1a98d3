"""The example recipes compose into OPD configs that verl-opd and verl accept (no GPU, no training).

Each GPU script is a single ``python3 -m verl.trainer.main_ppo ... "$@"`` command. The test
reads that command from the script (backslash continuations joined, ``${VAR:-default}``
expanded, shlex-split), composes its overrides with Hydra's compose API, checks the OPD keys,
then runs verl-opd's driver hook and verl's ``validate_config`` on it.

Model paths: the scripts take them from ``STUDENT_MODEL`` / ``TEACHER_MODEL``. The test sets
those to the tiny student and teacher (one shared tokenizer), so the driver hook runs in full,
tokenizer check included, exactly as it would on the GPU machine; only the Qwen3 weights and
data files are absent (the hook does not read data).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
GPU_SCRIPTS = ["run_qwen3-8b_opd.sh", "run_qwen3-32b_to_8b_opd.sh"]
MAIN_PPO = ("-m", "verl.trainer.main_ppo")
ATTN_SDPA = "actor_rollout_ref.model.override_config.attn_implementation=sdpa"

# verl warns about optional engines it cannot import, and about the disabled critic.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def expand(text: str, env: dict[str, str]) -> str:
    """Expand ``${VAR:-default}``, ``${VAR}`` and ``$VAR`` like bash would (defaults expanded too)."""

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(3)
        if env.get(name):
            return env[name]
        default = match.group(2)
        return expand(default, env) if default is not None else ""

    return _VAR.sub(one, text)


def main_ppo_args(script: Path, env: dict[str, str]) -> tuple[str, list[str]]:
    """``(config_name, overrides)`` of the script's ``main_ppo`` command (``"$@"`` dropped)."""
    joined = re.sub(r"\\\n", " ", script.read_text())
    commands = [
        line for line in joined.splitlines() if " ".join(MAIN_PPO) in line and not line.lstrip().startswith("#")
    ]
    assert len(commands) == 1, f"{script.name}: expected one main_ppo command, found {len(commands)}"
    words = shlex.split(expand(commands[0], env))
    words = words[words.index(MAIN_PPO[1]) + 1 :]
    assert words[-1] == "$@", f'{script.name}: the command must end with "$@" so overrides pass through'
    words = words[:-1]
    config_name = "ppo_trainer"
    for word in list(words):
        if word.startswith("--config-name"):
            config_name = word.split("=", 1)[1]
            words.remove(word)
    return config_name, words


def compose(config_name: str, overrides: list[str]):
    from verl_opd.tools.doctor import compose_opd_config

    return compose_opd_config(overrides, config_name)


@pytest.fixture(scope="module")
def env(tiny) -> dict[str, str]:
    return {"HOME": os.path.expanduser("~"), "STUDENT_MODEL": str(tiny.student), "TEACHER_MODEL": str(tiny.teacher)}


@pytest.mark.parametrize("name", [*GPU_SCRIPTS, "run_tiny_opd_cpu.sh"])
def test_script_is_valid_bash(name):
    script = EXAMPLES / name
    assert os.access(script, os.X_OK), f"{name} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_expand_like_bash():
    env = {"A": "x", "HOME": "/h"}
    assert expand('p="${A:-d}" q=${B:-$HOME/d} r=$A s=${B}', env) == 'p="x" q=/h/d r=x s='


@pytest.mark.parametrize("name", GPU_SCRIPTS)
def test_gpu_script_composes_to_opd(name, env, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # trainer.resume_mode=auto looks for checkpoints under the cwd
    config_name, overrides = main_ppo_args(EXAMPLES / name, env)
    assert config_name == "opd_trainer"
    config = compose(config_name, overrides)

    assert config.algorithm.adv_estimator == "opd"
    assert config.opd.teacher.model_path == str(tiny.teacher)
    assert config.actor_rollout_ref.model.path == str(tiny.student)
    assert config.opd.discount == 0.0 and config.opd.kl_coef == 1.0 and config.opd.task_reward_coef == 0.0
    arr = config.actor_rollout_ref
    assert arr.rollout.name == "vllm"
    assert arr.actor.strategy in ("fsdp", "fsdp2") and arr.ref.strategy in ("fsdp", "fsdp2")
    assert arr.actor.use_kl_loss is False
    assert (arr.rollout.temperature, arr.rollout.top_p, arr.rollout.top_k) == (1.0, 1.0, -1)
    # Thinking Machines' shape: 64 prompts x 4 samples, one on-policy update per step.
    assert config.data.train_batch_size == 64 and arr.rollout.n == 4 and arr.actor.ppo_mini_batch_size == 64
    assert arr.actor.optim.lr == pytest.approx(1e-6) and arr.actor.optim.weight_decay == 0.0
    if "32b" in name:
        assert config.opd.teacher.offload is True and config.opd.teacher.dtype == "bfloat16"
    else:
        assert config.opd.teacher.offload is False and config.opd.teacher.dtype == "float32"

    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_opd.glue.driver import configure

    # teacher path, tokenizer check, refusals; sets the OPD keys. Not this GPU-less machine's resources or the
    # recipe's data files: the recipe is meant for an 8-GPU node.
    configure(config, check_environment=False)
    assert config.trainer.v1.trainer_mode == "opd"
    assert config.algorithm.use_kl_in_reward is True
    # Composed as on the GPU node (no trainer.device=cpu): both bodies compute in bf16, so FlashAttention (verl's
    # default attention, left unset by the recipes) is fine, and the workers get fp32 LM heads.
    assert "trainer.device" not in " ".join(overrides)
    assert config.opd.precision == "bf16" and arr.opd.precision == "bf16"
    for role in (arr.actor, arr.ref):
        assert OmegaConf.to_container(role.fsdp_config.mixed_precision)["param_dtype"] == "bf16"
    assert not arr.model.get("use_fused_kernels", False)  # verl's fused head would bypass the fp32 LM head
    assert OmegaConf.select(config, "actor_rollout_ref.model.override_config.attn_implementation") is None
    assert arr.ref.fsdp_config.model_dtype == ("bf16" if "32b" in name else "fp32")  # teacher storage
    assert config.actor_rollout_ref.opd.teacher.model_path == str(tiny.teacher)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    assert need_reference_policy(config) and not need_critic(config)


@pytest.mark.parametrize("name", GPU_SCRIPTS)
def test_gpu_script_refuses_fp32_with_flash_attention(name, env, tmp_path, monkeypatch):
    """opd.precision=fp32 added to a recipe keeps verl's FlashAttention: refused before anything loads."""
    from verl_opd.config.opd_config import OPDConfigError
    from verl_opd.glue.driver import configure

    monkeypatch.chdir(tmp_path)
    config_name, overrides = main_ppo_args(EXAMPLES / name, env)
    config = compose(config_name, [*overrides, "opd.precision=fp32"])
    with pytest.raises(OPDConfigError, match="attention is FlashAttention"):
        configure(config, check_environment=False)
    sdpa = compose(config_name, [*overrides, "opd.precision=fp32", "++" + ATTN_SDPA])
    configure(sdpa, check_environment=False)
    assert sdpa.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "fp32"


def test_gpu_script_env_overrides(env):
    _, overrides = main_ppo_args(
        EXAMPLES / "run_qwen3-32b_to_8b_opd.sh", {**env, "TEACHER_OFFLOAD": "False", "GPUS_PER_NODE": "4"}
    )
    assert "opd.teacher.offload=False" in overrides and "trainer.n_gpus_per_node=4" in overrides


@pytest.mark.parametrize(
    ("offload", "teacher_gib_resident", "max_utilization"), [("True", 0.0, 0.81), ("False", 7.6, 0.72)]
)
def test_32b_recipe_memory_plan(offload, teacher_gib_resident, max_utilization):
    """Qwen3-8B-Base + Qwen3-32B on 8 x 80 GB with the recipe's keys (the figures in examples/OPD_README.md).

    Expected values come from the published counts (8.2B, 32.8B; the plan's own counts are within
    1%, test_memory_plan.py): teacher 32.8e9 x 2 B / 8 GPUs = 7.64 GiB per GPU; the student keeps
    8.2e9 x (4 + 8) B / 8 = 11.5 GiB of fp32 shards + Adam moments through generation. The highest
    gpu_memory_utilization that fits is (79.6 - 3 reserved - resident) / 79.6 rounded down: a 1%
    error in the counts moves it by < 0.003, so it is asserted exactly.
    """
    from verl_opd.checks.memory_plan import GENERATION, GIB, inputs_from_config, judge, plan_memory
    from verl_opd.tools.doctor.plan import DEFAULT_GPU_MEMORY_GIB

    assets = REPO / "tests" / "assets"
    env = {"STUDENT_MODEL": str(assets / "qwen3-8b-base"), "TEACHER_MODEL": str(assets / "qwen3-32b")}
    config_name, overrides = main_ppo_args(EXAMPLES / "run_qwen3-32b_to_8b_opd.sh", {**env, "TEACHER_OFFLOAD": offload})
    plan = plan_memory(inputs_from_config(compose(config_name, overrides), DEFAULT_GPU_MEMORY_GIB))

    assert {v.status for v in judge(plan).values()} == {"PASS"}
    assert plan.max_gpu_memory_utilization == max_utilization
    generation = {c.name: c.bytes / GIB for c in plan.phase(GENERATION).components}
    assert generation.get("teacher qwen3-32b", 0.0) == pytest.approx(teacher_gib_resident, abs=0.1)
    assert generation["student Adam moments"] == pytest.approx(8.2e9 * 8 / 8 / GIB, rel=0.01)
    assert generation["vLLM weights"] == pytest.approx(8.2e9 * 2 / 2 / GIB, rel=0.01)  # bf16, TP 2
    host = sum(c.bytes for c in plan.host) / GIB
    assert host == pytest.approx(32.8e9 * 2 / GIB if offload == "True" else 0.0, rel=0.01)  # 8 shards per node


def test_cpu_script_steps_env(env):
    config_name, overrides = main_ppo_args(EXAMPLES / "run_tiny_opd_cpu.sh", {**env, "OPD_STEPS": "7"})
    assert config_name == "ppo_trainer"
    assert "trainer.total_training_steps=7" in overrides
    assert "trainer.device=cpu" in overrides and "algorithm.adv_estimator=opd" in overrides
    _, default = main_ppo_args(EXAMPLES / "run_tiny_opd_cpu.sh", env)
    assert "trainer.total_training_steps=3" in default
    assert any(o.startswith("+opd.teacher.model_path=") for o in default)


def test_opd_example_dry_run(tiny, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "opd_example.py"),
            "--dry-run",
            "--cpu",
            "--student",
            str(tiny.student),
            "--teacher",
            str(tiny.teacher),
            "--data-dir",
            str(tiny.data),
            "trainer.resume_mode=disable",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "adv_estimator: opd" in out
    assert f"model_path: {tiny.teacher}" in out
    assert "trainer_mode: opd" in out  # set by verl-opd's driver hook
    assert "name: hf" in out  # the CPU rollout, set by trainer.device=cpu
    assert "not launched" in out
