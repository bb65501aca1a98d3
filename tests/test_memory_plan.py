"""The memory plan (``verl_opd.checks.memory_plan``) and its doctor front-end (``--plan``).

Parameter counts are checked against published counts and against real models; the
per-phase arithmetic against hand-computed values on a made-up shape with round numbers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from verl_opd.checks.memory_plan import (
    GENERATION,
    GIB,
    RESERVE_GIB,
    STUDENT_LOG_PROB,
    TEACHER_LOG_PROB,
    UPDATE,
    Cluster,
    MemoryPlanError,
    ModelShape,
    PlanInputs,
    RolloutRun,
    StudentRun,
    TeacherRun,
    TokenBudget,
    judge,
    plan_memory,
)
from verl_opd.tools.doctor import main

ASSETS = Path(__file__).resolve().parent / "assets"


@pytest.mark.parametrize(
    ("name", "total", "non_embedding"),
    # Qwen3 model cards: "Number of Parameters: 8.2B, Non-Embedding: 6.95B" / "32.8B, 31.2B"
    [("qwen3-8b-base", 8.2e9, 6.95e9), ("qwen3-32b", 32.8e9, 31.2e9)],
)
def test_qwen3_parameter_counts_match_published(name, total, non_embedding):
    shape = ModelShape.from_path(str(ASSETS / name))
    assert shape.parameters() == pytest.approx(total, rel=0.01)
    assert shape.parameters() - shape.embedding_parameters() == pytest.approx(non_embedding, rel=0.01)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_kit_model_counted_exactly(tiny):
    """Qwen2 layout: q/k/v biases, tied embeddings (counted once)."""
    from transformers import AutoModelForCausalLM

    shape = ModelShape.from_path(str(tiny.teacher))
    assert shape.qkv_bias and shape.tie_word_embeddings
    assert shape.parameters() == _numel(AutoModelForCausalLM.from_pretrained(tiny.teacher))


def test_untied_qwen3_counted_exactly():
    """Qwen3 layout: q/k norms, explicit head_dim != hidden / heads, untied LM head, no biases."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    shape = ModelShape.from_config(config.to_dict(), "qwen3-tiny")
    assert shape.qk_norm and not shape.tie_word_embeddings and not shape.qkv_bias
    assert shape.parameters() == _numel(Qwen3ForCausalLM(config))


def test_moe_is_refused_with_the_key(tmp_path):
    config = json.loads((ASSETS / "qwen3-8b-base" / "config.json").read_text())
    with pytest.raises(MemoryPlanError, match=r"mixture-of-experts model \(num_experts=128"):
        ModelShape.from_config({**config, "num_experts": 128, "model_type": "qwen3_moe"}, "moe")


# A made-up dense shape with round numbers: 10 layers of 1000 + 5 x 1000 embedding rows (tied).
SHAPE = ModelShape(
    name="round",
    model_type="llama",
    vocab_size=1000,
    hidden_size=100,
    num_layers=10,
    num_heads=4,
    num_kv_heads=2,
    head_dim=25,
    intermediate_size=200,
    tie_word_embeddings=True,
    qkv_bias=False,
    qk_norm=False,
)
# per layer: q 100x100 + k 100x50 + v 100x50 + o 100x100 + 3 x 100x200 + 2 norms of 100
LAYER = 10_000 + 5_000 + 5_000 + 10_000 + 60_000 + 200
PARAMS = 10 * LAYER + 1000 * 100 + 100


def _inputs(**changes) -> PlanInputs:
    budget = TokenBudget(1000, "budget")
    student = StudentRun(SHAPE, storage_bytes=4, train_budget=budget, log_prob_budget=budget)
    teacher = TeacherRun(dataclasses.replace(SHAPE, name="t"), storage_bytes=2, offload=False, log_prob_budget=budget)
    base = PlanInputs(
        cluster=Cluster(n_gpus_per_node=4, nnodes=2, gpu_memory_gib=10.0),
        student=student,
        teachers=(teacher,),
        rollout=RolloutRun(tensor_parallel=2, gpu_memory_utilization=0.5),
        compute_bytes=2,
    )
    return dataclasses.replace(base, **changes)


def _bytes(plan, phase: str, component: str) -> float:
    return sum(c.bytes for c in plan.phase(phase).components if c.name == component)


def test_round_shape_count():
    assert SHAPE.layer_parameters() == LAYER
    assert SHAPE.parameters() == PARAMS


def test_sharded_state_and_resident_teacher():
    plan = plan_memory(_inputs())
    for phase in (GENERATION, STUDENT_LOG_PROB, TEACHER_LOG_PROB, UPDATE):
        assert _bytes(plan, phase, "student params") == PARAMS * 4 / 8
        assert _bytes(plan, phase, "student Adam moments") == PARAMS * 8 / 8
        assert _bytes(plan, phase, "teacher t") == PARAMS * 2 / 8
    assert _bytes(plan, UPDATE, "student grads") == PARAMS * 4 / 8
    assert _bytes(plan, GENERATION, "student grads") == 0
    assert plan.vllm_weights == PARAMS * 2 / 2
    assert _bytes(plan, GENERATION, "vLLM KV cache + activations") == 0.5 * 10 * GIB - PARAMS
    # the logits: tokens x vocab x 4 B, twice in the student's pass (entropy), once in the teacher's
    assert _bytes(plan, STUDENT_LOG_PROB, "student logits (fp32)") == 2 * 1000 * 1000 * 4
    assert _bytes(plan, TEACHER_LOG_PROB, "teacher t logits (fp32)") == 1000 * 1000 * 4
    assert _bytes(plan, UPDATE, "student logits (fp32)") == 2 * 1000 * 1000 * 4
    assert plan.host == ()
    kept = PARAMS * (4 + 8 + 2) / 8
    assert plan.max_gpu_memory_utilization == int(100 * ((10 - RESERVE_GIB) * GIB - kept) / (10 * GIB)) / 100


def test_shaping_adds_its_buffers_and_the_students_potential_pass():
    """opd.teacher.shaping: the extension-mass blocks next to the teacher's logits; ``both`` adds the student's
    forward in the teacher's pass (on the teacher's token budget), a phase of its own."""
    inputs = _inputs()
    plain = plan_memory(inputs)
    buffers = 256 * 1000 * 4 * 3  # positions per block x vocab x fp32 x temporaries
    teacher_only = plan_memory(
        dataclasses.replace(inputs, teachers=(dataclasses.replace(inputs.teachers[0], shaping="teacher"),))
    )
    assert teacher_only.phase(TEACHER_LOG_PROB).total == plain.phase(TEACHER_LOG_PROB).total + buffers
    assert [p.name for p in teacher_only.phases] == [p.name for p in plain.phases]
    both = plan_memory(dataclasses.replace(inputs, teachers=(dataclasses.replace(inputs.teachers[0], shaping="both"),)))
    potentials = both.phase(f"{TEACHER_LOG_PROB} (student potentials)")
    assert _bytes(both, potentials.name, "student logits (fp32)") == 1000 * 1000 * 4  # no entropy
    assert _bytes(both, potentials.name, "student shaping buffers") == buffers
    assert _bytes(both, potentials.name, "student params") == PARAMS * 4 / 8


def test_teacher_offload_moves_it_to_host_memory():
    resident = plan_memory(_inputs())
    inputs = _inputs()
    offloaded = plan_memory(
        dataclasses.replace(inputs, teachers=(dataclasses.replace(inputs.teachers[0], offload=True),))
    )
    assert _bytes(offloaded, GENERATION, "teacher t") == 0
    assert offloaded.phase(GENERATION).total == resident.phase(GENERATION).total - PARAMS * 2 / 8
    (host,) = offloaded.host
    assert host.bytes == PARAMS * 2 / 8 * 4  # one shard per GPU, 4 GPUs per node


def test_optimizer_and_param_offload_leave_generation():
    inputs = _inputs()
    student = dataclasses.replace(inputs.student, param_offload=True, optimizer_offload=True)
    plan = plan_memory(dataclasses.replace(inputs, student=student))
    assert _bytes(plan, GENERATION, "student params") == 0
    assert _bytes(plan, GENERATION, "student Adam moments") == 0
    assert _bytes(plan, STUDENT_LOG_PROB, "student Adam moments") == 0
    assert _bytes(plan, UPDATE, "student Adam moments") == PARAMS  # loaded back for the update
    assert sum(c.bytes for c in plan.host) == (PARAMS * 4 / 8 + PARAMS * 8 / 8) * 4


def test_lora_counts_optimizer_state_for_the_adapters_only():
    inputs = _inputs()
    student = dataclasses.replace(inputs.student, lora_rank=8, lora_target_modules=("q_proj", "down_proj"))
    plan = plan_memory(dataclasses.replace(inputs, student=student))
    adapters = 10 * 8 * ((100 + 100) + (200 + 100))  # rank x (in + out), per layer
    assert _bytes(plan, UPDATE, "student Adam moments") == adapters * 8 / 8
    assert _bytes(plan, UPDATE, "student grads") == adapters * 4 / 8
    assert _bytes(plan, UPDATE, "student params") == PARAMS * 4 / 8
    with pytest.raises(MemoryPlanError, match="target_modules has \\['lm_head'\\]"):
        SHAPE.lora_parameters(8, ("lm_head",))


def test_vllm_awake_during_training_without_free_cache_engine():
    inputs = _inputs()
    plan = plan_memory(
        dataclasses.replace(inputs, rollout=dataclasses.replace(inputs.rollout, free_cache_engine=False))
    )
    assert _bytes(plan, UPDATE, "vLLM (awake: free_cache_engine=False)") == 0.5 * 10 * GIB


@pytest.mark.parametrize(
    ("utilization", "gpu_gib", "status", "text"),
    [
        (0.5, 10.0, "PASS", "the highest that fits is"),
        (0.9, 10.0, "FAIL", "gpu_memory_utilization=0.9 asks"),
        (0.5, 3.001, "FAIL", "no room for vLLM"),
        (1e-6, 10.0, "FAIL", "not more than its weights"),
    ],
)
def test_generation_verdict(utilization, gpu_gib, status, text):
    inputs = _inputs()
    inputs = dataclasses.replace(
        inputs,
        rollout=dataclasses.replace(inputs.rollout, gpu_memory_utilization=utilization),
        cluster=dataclasses.replace(inputs.cluster, gpu_memory_gib=gpu_gib),
    )
    verdict = judge(plan_memory(inputs))[GENERATION]
    assert verdict.status == status and text in verdict.reason


def test_gpu_smaller_than_the_reserve_is_refused():
    with pytest.raises(MemoryPlanError, match="--gpu-memory-gib=2 leaves nothing"):
        plan_memory(_inputs(cluster=Cluster(n_gpus_per_node=1, nnodes=1, gpu_memory_gib=2)))


def test_update_that_does_not_fit_fails():
    inputs = _inputs()
    big = TokenBudget(1_000_000, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu")  # logits alone: 7.5 GiB
    plan = plan_memory(dataclasses.replace(inputs, student=dataclasses.replace(inputs.student, train_budget=big)))
    verdicts = judge(plan)
    assert verdicts[UPDATE].status == "FAIL" and "does not fit" in verdicts[UPDATE].reason
    assert verdicts[TEACHER_LOG_PROB].status == "PASS"


def _gpu_overrides(tiny) -> list[str]:
    return [
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
    ]


def _doctor_plan(capsys, tiny, *extra: str) -> tuple[int, str]:
    skips = ("--skip", "plugin", "--skip", "tokenizers", "--skip", "config")
    argv = [*skips, "--plan", "--student", str(tiny.student), "--teacher", str(tiny.teacher), *extra]
    code = main(argv)
    return code, capsys.readouterr().out


def test_doctor_plan_tiny_models(tiny, capsys):
    code, out = _doctor_plan(capsys, tiny, *_gpu_overrides(tiny))
    assert code == 0, out
    assert "PASS  [plan] memory per GPU: GiB per GPU (1 x 1 GPUs of 79.6 GiB" in out
    assert "PASS  [plan] generation:" in out and "the highest that fits is 0.96" in out
    assert "PASS  [plan] update:" in out


def test_doctor_plan_fails_on_a_small_gpu(tiny, capsys):
    code, out = _doctor_plan(capsys, tiny, "--gpu-memory-gib", "4", *_gpu_overrides(tiny))
    assert code == 1, out
    assert "FAIL  [plan] generation:" in out and "gpu_memory_utilization=0.5 asks 2.0 GiB" in out


def test_doctor_plan_names_the_missing_micro_batch(tiny, capsys):
    code, out = _doctor_plan(capsys, tiny, "actor_rollout_ref.rollout.name=vllm")
    assert code == 1
    assert "FAIL  [plan] inputs: no micro-batch size to plan with: set actor_rollout_ref.actor." in out


def test_doctor_without_plan_skips_it(tiny, capsys):
    code = main(["--skip", "plugin", "--skip", "tokenizers", "--skip", "config", "--student", str(tiny.student)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "SKIP  [plan] skipped" in out
