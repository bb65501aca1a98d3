"""The teacher is built like verl's reference model, minus the student (issue 11, item 2).

Its model config drops what only the student uses; the driver refuses a teacher whose
context or attention heads do not fit the run, reading only its ``config.json``.
"""

from __future__ import annotations

import json
import shutil

import pytest
from hydra import compose, initialize_config_module
from verl.utils.config import omega_conf_to_dataclass

from verl_opd.checks.teacher_fit import teacher_context_length
from verl_opd.config.opd_config import OPDConfigError, apply_opd_settings
from verl_opd.glue.teacher_worker import teacher_model_config


def _compose(overrides: list[str]):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=overrides)


def _opd(tiny, teacher, *extra: str):
    return _compose(
        [
            "algorithm.adv_estimator=opd",
            f"actor_rollout_ref.model.path={tiny.student}",
            f"+opd.teacher.model_path={teacher}",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "data.max_prompt_length=64",
            "data.max_response_length=16",
            *extra,
        ]
    )


def _teacher_with(tiny, tmp_path, **changes):
    """A copy of the tiny teacher (4 heads, 2 kv heads) with ``changes`` written into its config.json."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny.teacher, teacher)
    config_file = teacher / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return teacher


def test_teacher_config_keeps_nothing_of_the_student(tiny):
    """MTP, LoRA, gradient checkpointing and the student's HF overrides stay with the student."""
    config = _compose(
        [
            f"actor_rollout_ref.model.path={tiny.student}",
            "+actor_rollout_ref.model.override_config.attention_dropout=0.3",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
            "actor_rollout_ref.model.mtp.enable=True",
            "actor_rollout_ref.model.lora_rank=8",
            "actor_rollout_ref.model.enable_gradient_checkpointing=True",
            "actor_rollout_ref.model.enable_activation_offload=True",
            "actor_rollout_ref.model.use_remove_padding=True",
        ]
    )
    student = omega_conf_to_dataclass(config.actor_rollout_ref.model)  # as verl builds it (engine_workers.py:540)
    assert student.hf_config.attention_dropout == 0.3 and student.mtp.enable and student.lora_rank == 8

    teacher = teacher_model_config(student, str(tiny.teacher))

    assert teacher.path == teacher.hf_config_path == teacher.tokenizer_path == str(tiny.teacher)
    assert teacher.local_path == str(tiny.teacher)
    assert teacher.hf_config.hidden_size == 64 and student.hf_config.hidden_size == 32  # the teacher's HF config
    assert teacher.tokenizer.name_or_path == str(tiny.teacher)
    assert teacher.override_config == {"attn_implementation": "sdpa"}
    assert teacher.hf_config.attention_dropout == 0.0  # the teacher's own value, not the student's override
    assert teacher.hf_config._attn_implementation == "sdpa"  # the run's kernel choice is kept
    assert not teacher.mtp.enable
    assert teacher.lora_rank == 0 and teacher.lora == {} and teacher.lora_adapter_path is None
    assert not teacher.enable_gradient_checkpointing and not teacher.enable_activation_offload
    assert teacher.use_remove_padding  # a property of the run, as for verl's own ref model
    assert student.path == str(tiny.student) and student.lora_rank == 8  # the student's config is untouched


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ({"max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default"}}, 4096),
        ({"max_position_embeddings": 2048, "rope_scaling": None}, 2048),
        # Qwen's YaRN recipe: max_position_embeddings is the original length
        ({"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0}}, 131072),
        # Llama 3.1: max_position_embeddings already includes the factor
        (
            {
                "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
            },
            131072,
        ),
        ({"num_attention_heads": 4}, None),
    ],
)
def test_teacher_context_length_reads_rope_scaling(text, expected):
    assert teacher_context_length(text) == expected


def test_teacher_with_a_short_context_is_refused(tiny, tmp_path):
    short = _teacher_with(tiny, tmp_path, max_position_embeddings=64)
    with pytest.raises(OPDConfigError) as error:
        apply_opd_settings(_opd(tiny, short))
    message = str(error.value)
    assert f"The teacher ({short}) covers 64 positions" in message
    assert "data.max_prompt_length + data.max_response_length = 64 + 16 = 80" in message
    assert "to a total of at most 64" in message

    apply_opd_settings(_opd(tiny, short, "data.max_prompt_length=48"))  # 48 + 16 fits exactly


def test_rope_scaling_extends_the_teachers_context(tiny, tmp_path):
    scaled = _teacher_with(
        tiny, tmp_path, max_position_embeddings=64, rope_parameters={"rope_type": "linear", "factor": 2.0}
    )
    apply_opd_settings(_opd(tiny, scaled))  # 80 tokens within 2 x 64


ACTOR_SP = "actor_rollout_ref.actor.ulysses_sequence_parallel_size"
REF_SP = "actor_rollout_ref.ref.ulysses_sequence_parallel_size"
REF_ENGINE_SP = "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (f"{ACTOR_SP}=3", f"{REF_SP}=3"),  # verl's ref defaults to the actor's size (trainer/config/ref/dp_ref.yaml:39)
        (f"{REF_SP}=8", f"{REF_SP}=8"),
        (f"{REF_ENGINE_SP}=3", f"{REF_ENGINE_SP}=3"),
    ],
)
def test_sequence_parallel_size_that_cannot_split_the_heads_is_refused(tiny, override, key):
    with pytest.raises(OPDConfigError) as error:
        apply_opd_settings(_opd(tiny, tiny.teacher, override))
    message = str(error.value)
    assert message.startswith(f"{key} cannot split the teacher's attention heads")
    assert "num_attention_heads=4, num_key_value_heads=2" in message
    assert "to one of [1, 2, 4]" in message


def test_sequence_parallel_size_that_splits_the_heads_passes(tiny):
    config = _opd(tiny, tiny.teacher, f"{ACTOR_SP}=4")
    apply_opd_settings(config)  # 4 heads / 4; 2 kv heads are repeated (4 % 2 == 0), as verl allows
    assert config.actor_rollout_ref.ref.ulysses_sequence_parallel_size == 4
