"""Bad input gets a clear error before any model is loaded (issue 4); good input gets OPD's settings."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from verl_opd.checks.tokenizer_check import TokenizerMismatchError, compare_tokenizers
from verl_opd.config.opd_config import OPDConfig, OPDConfigError, TeacherConfig, apply_opd_settings


def _compose(overrides: list[str], config_name: str = "ppo_trainer"):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose(config_name, overrides=overrides)


def _opd(tiny, *extra: str, teacher=None) -> list[str]:
    teacher = tiny.teacher if teacher is None else teacher
    return [
        "algorithm.adv_estimator=opd",
        f"actor_rollout_ref.model.path={tiny.student}",
        f"+opd.teacher.model_path={teacher}",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def variants(tiny, tmp_path_factory):
    """Teachers that differ from the student in exactly one tokenizer aspect."""
    root = tmp_path_factory.mktemp("variants")
    other_ids = root / "other_ids"
    shutil.copytree(tiny.teacher, other_ids)
    tokenizer_file = other_ids / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]  # same vocabulary size, two ids swapped
    tokenizer_file.write_text(json.dumps(tokenizer))

    other_template = root / "other_template"
    shutil.copytree(tiny.teacher, other_template)
    template = other_template / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))

    other_special = root / "other_special"
    shutil.copytree(tiny.teacher, other_special)
    config_file = other_special / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["eos_token"] = "<|endoftext|>"
    config_file.write_text(json.dumps(tokenizer_config))
    return {"other_ids": other_ids, "other_template": other_template, "other_special": other_special}


def test_compatible_pair_passes_and_settings_are_applied(tiny, caplog):
    config = _compose(_opd(tiny))
    with caplog.at_level(logging.WARNING):
        changes = apply_opd_settings(config)
    assert config.algorithm.use_kl_in_reward is True
    # nothing reads verl's in-reward KL settings under OPD (the trainer replaces that step): left untouched
    assert not any(change.startswith(("algorithm.kl_", "algorithm.norm_adv")) for change in changes), changes
    assert config.trainer.v1.trainer_mode == "opd"
    assert config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu == 4
    # no trainer.device: a GPU run, whose opd.precision=auto is bf16 compute (fp32 heads: verl_opd.glue.precision)
    assert config.actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype == "bf16"
    assert config.actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype == "bf16"
    assert config.actor_rollout_ref.opd.precision == "bf16"  # workers get it resolved
    assert config.actor_rollout_ref.ref.fsdp_config.model_dtype == "fp32"
    assert config.actor_rollout_ref.opd.teacher.model_path == str(tiny.teacher)  # workers get the opd node
    assert "algorithm.use_kl_in_reward=True" in changes
    assert "algorithm.adv_estimator=opd applied" in caplog.text
    assert all(check.passed for check in compare_tokenizers(str(tiny.student), str(tiny.teacher)))


def test_shipped_config_needs_no_extra_keys(tiny):
    config = _compose(
        [f"opd.teacher.model_path={tiny.teacher}", f"actor_rollout_ref.model.path={tiny.student}"], "opd_trainer"
    )
    assert config.algorithm.adv_estimator == "opd" and config.actor_rollout_ref.rollout.n == 1
    assert config.opd.discount == 0.0 and config.algorithm.use_kl_in_reward is True
    apply_opd_settings(config)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["actor_rollout_ref.actor.use_kl_loss=True"], "actor_rollout_ref.actor.use_kl_loss=False"),
        (["trainer.use_v1=False"], "Set trainer.use_v1=True"),
        (["distillation.enabled=True"], "set distillation.enabled=False"),
        (["algorithm.rollout_correction.bypass_mode=True"], "Set algorithm.rollout_correction.bypass_mode=False"),
        (["+opd.kl_coef=0"], "opd.kl_coef=0 must be"),
        (["+opd.discount=1.5"], "opd.discount=1.5 must be in [0, 1]"),
        (["+opd.sampler_poll_s=0"], "opd.sampler_poll_s=0 must be a finite number of seconds > 0"),
        (["+opd.teacher.dtype=int8"], "opd.teacher.dtype='int8'"),
        (["+opd.temprature=1"], "Unknown opd keys ['opd.temprature']; valid keys: ['opd.allow_teacher_change',"),
        (
            ["+opd.teacher.dtyp=bfloat16"],
            "Unknown opd keys ['opd.teacher.dtyp']; valid keys: ['opd.teacher.context_key', 'opd.teacher.dtype', "
            "'opd.teacher.model_path', 'opd.teacher.offload', 'opd.teacher.shaping', 'opd.teacher.system_prompt', "
            "'opd.teacher.view']",
        ),
        (["+opd.kl_coef=abc"], "opd.kl_coef='abc' (str) must be a number"),
        (["+opd.discount=null"], "opd.discount=None (NoneType) must be a number"),
        (["+opd.teacher.offload=yes"], "opd.teacher.offload='yes' (str) must be true or false"),
        (["+opd.check_tokenizers=no"], "opd.check_tokenizers='no' (str) must be true or false"),
        (["+opd.allow_teacher_change=1"], "opd.allow_teacher_change=1 (int) must be true or false"),
        (["+opd.task_reward_coef=true"], "opd.task_reward_coef=True (bool) must be a number"),
        (["trainer.device=cpu", "+opd.teacher.offload=True"], "Set opd.teacher.offload=False"),
        (["+opd.precision=fp16"], "opd.precision='fp16'; use one of ('auto', 'fp32', 'bf16')"),
        (["+opd.recompute=sometimes"], "opd.recompute='sometimes'; use one of ('auto', 'always', 'never')"),
        # never skips the recompute or refuses, naming what makes skipping inexact
        (["+opd.recompute=never", "actor_rollout_ref.actor.ppo_epochs=2"], "here actor_rollout_ref.actor.ppo_epochs=2"),
        (["+opd.teacher.dtype=float16"], "what both models compute in is opd.precision"),
        # fp32 compute with verl's default attention (FlashAttention, bf16/fp16 only), unset or explicit
        (["+opd.precision=fp32"], "(actor_rollout_ref.model.override_config.attn_implementation unset (verl's"),
        (
            ["+opd.precision=fp32", "+actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2"],
            "Set actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        ),
        # bf16 logits from verl's torch fused LM head (its default backend)
        (["actor_rollout_ref.model.use_fused_kernels=True"], "fused_kernel_options.impl_backend=torch computes"),
        # opd.teacher.view (issue 12): checked before any tokenizer loads
        (["+opd.teacher.view=both"], "opd.teacher.view='both'; use one of ('student', 'own')"),
        (["+opd.teacher.system_prompt=Hint"], "opd.teacher.system_prompt is read only when the teacher reads its own"),
        (["+opd.teacher.context_key=extra_info.answer"], "set opd.teacher.view=own, or remove opd.teacher.context_key"),
        (["+opd.teacher.view=own", "+opd.teacher.context_key=extra_info."], "must be a dotted dataset field such as"),
        (["+opd.teacher.view=own", "+opd.teacher.system_prompt=3"], "opd.teacher.system_prompt=3 (int) must be a"),
        # opd.teacher.shaping: own view only, and only where verl's logits hook sees whole sequences
        (["+opd.teacher.view=own", "+opd.teacher.shaping=yes"], "opd.teacher.shaping='yes'; use one of ('auto',"),
        (["+opd.teacher.shaping=both"], "set opd.teacher.view=own, or remove opd.teacher.shaping"),
        (
            [
                "+opd.teacher.view=own",
                "+opd.teacher.shaping=both",
                "actor_rollout_ref.ref.ulysses_sequence_parallel_size=2",
            ],
            "Set actor_rollout_ref.ref.ulysses_sequence_parallel_size=1, or opd.teacher.shaping=none",
        ),
        (
            [
                "+opd.teacher.view=own",
                "+opd.teacher.shaping=teacher",
                "actor_rollout_ref.model.use_fused_kernels=True",
                "actor_rollout_ref.model.fused_kernel_options.impl_backend=triton",
            ],
            "verl's fused LM head never materialises",
        ),
    ],
)
def test_conflicting_settings_are_refused(tiny, extra, expected):
    with pytest.raises(OPDConfigError) as error:
        apply_opd_settings(_compose(_opd(tiny, *extra)))
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("extra", "precision"),
    [
        ([], "bf16"),  # GPU default
        # CPU default (the driver's CPU settings pick sdpa before the OPD settings run)
        (["trainer.device=cpu", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"], "fp32"),
        (["+opd.precision=fp32", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"], "fp32"),
        (["trainer.device=cpu", "+opd.precision=bf16"], "bf16"),
        (
            [
                "actor_rollout_ref.model.use_fused_kernels=True",
                "actor_rollout_ref.model.fused_kernel_options.impl_backend=triton",
            ],
            "bf16",
        ),
    ],
)
def test_precision_sets_both_engines(tiny, extra, precision):
    """opd.precision is the compute dtype of both engines; opd.teacher.dtype only the teacher's storage."""
    config = _compose(_opd(tiny, "+opd.teacher.dtype=bfloat16", *extra))
    apply_opd_settings(config)
    arr = config.actor_rollout_ref
    for role in (arr.actor, arr.ref):
        assert OmegaConf.to_container(role.fsdp_config.mixed_precision) == {
            "param_dtype": precision,
            "reduce_dtype": "fp32",
            "buffer_dtype": "fp32",
        }
    assert arr.ref.fsdp_config.model_dtype == "bf16"
    assert arr.opd.precision == precision


ONE_UPDATE = ["data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4"]


@pytest.mark.parametrize(
    ("extra", "kept_because"),
    [
        ([], None),  # one on-policy update per step: skipped
        (["+opd.recompute=never"], None),
        (["actor_rollout_ref.actor.ppo_mini_batch_size=8"], None),  # a mini-batch larger than the step's batch
        (["+opd.recompute=always"], "opd.recompute=always"),
        (["actor_rollout_ref.actor.ppo_epochs=2"], "actor_rollout_ref.actor.ppo_epochs=2"),
        (["actor_rollout_ref.actor.ppo_mini_batch_size=2"], "actor_rollout_ref.actor.ppo_mini_batch_size=2"),
        # verl's sync trainer updates twice per step, each time on 4 of the 8 prompts: one mini-batch each
        (["data.train_batch_size=8", "+trainer.v1.sync.parameter_sync_step=2"], None),
        (["data.train_batch_size=8"], "actor_rollout_ref.actor.ppo_mini_batch_size=4 (< 8 prompts per update"),
        (["actor_rollout_ref.actor.policy_loss.loss_mode=gspo"], "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"),
        (["algorithm.rollout_correction.rollout_is=token"], "algorithm.rollout_correction.rollout_is=token"),
        (["algorithm.rollout_correction.rollout_rs=token_k1"], "algorithm.rollout_correction.rollout_rs=token_k1"),
        (["+actor_rollout_ref.model.override_config.attention_dropout=0.1"], "the student's attention_dropout=0.1"),
        (["+opd.teacher.view=own"], "opd.teacher.view=own"),  # chunk rewards: the loss corrects per token only
    ],
)
def test_recompute_is_skipped_only_where_exact(tiny, caplog, extra, kept_because):
    """Skipped: the onpolicy loss takes over and the log says why; kept: the log names the key that needs it."""
    config = _compose(_opd(tiny, *ONE_UPDATE, *extra))
    with caplog.at_level(logging.WARNING):
        apply_opd_settings(config)
    arr = config.actor_rollout_ref
    if kept_because is None:
        assert arr.opd.recompute == "never"
        assert arr.actor.policy_loss.loss_mode == "opd_onpolicy"
        assert "old_log_prob recompute skipped: exact because" in caplog.text
    else:
        assert arr.opd.recompute == "always"
        assert arr.actor.policy_loss.loss_mode != "opd_onpolicy"
        assert f"old_log_prob recompute kept because {kept_because}" in caplog.text


def test_opd_node_shape_is_checked_against_the_dataclasses():
    """A scalar where a node belongs is refused by key; a null node means that node's defaults."""
    with pytest.raises(OPDConfigError, match=r"opd.teacher='abc' must be a mapping with the keys"):
        OPDConfig.from_config(OmegaConf.create({"opd": {"teacher": "abc"}}))
    assert OPDConfig.from_config(OmegaConf.create({"opd": {"teacher": None}})).teacher == TeacherConfig()
    wrong = dataclasses.replace(OPDConfig(), teacher={"model_path": "x"})  # built in code, not from a config
    with pytest.raises(OPDConfigError, match=r"opd.teacher must be a TeacherConfig"):
        wrong.validate()


def test_missing_or_unreadable_teacher(tiny, tmp_path):
    no_teacher = _compose(["algorithm.adv_estimator=opd", f"actor_rollout_ref.model.path={tiny.student}"])
    with pytest.raises(OPDConfigError, match=r"needs a teacher: set opd.teacher.model_path"):
        apply_opd_settings(no_teacher)
    with pytest.raises(OPDConfigError, match=r"not a readable Hugging Face model directory"):
        apply_opd_settings(_compose(_opd(tiny, teacher=tmp_path / "nope")))


@pytest.mark.parametrize(
    ("variant", "failed_check"),
    [
        ("other_ids", "vocabulary ids"),
        ("other_template", "chat template"),
        ("other_special", "special tokens"),
    ],
)
def test_incompatible_tokenizers_are_refused(tiny, variants, variant, failed_check):
    with pytest.raises(TokenizerMismatchError) as error:
        apply_opd_settings(_compose(_opd(tiny, teacher=variants[variant])))
    message = str(error.value)
    assert f"- {failed_check}:" in message
    assert "share one tokenizer and chat template" in message


def test_original_design_key_is_accepted_as_the_teacher(tiny):
    config = _compose(
        [
            "algorithm.adv_estimator=opd",
            f"actor_rollout_ref.model.path={tiny.student}",
            f"+actor_rollout_ref.ref.model.path={tiny.teacher}",
        ]
    )
    apply_opd_settings(config)
    assert config.opd.teacher.model_path == str(tiny.teacher)
    assert "model" not in config.actor_rollout_ref.ref  # would crash verl's ref dataclass

    both = _compose(_opd(tiny, f"+actor_rollout_ref.ref.model.path={tiny.student_copy}"))
    with pytest.raises(OPDConfigError, match="Keep only opd.teacher.model_path"):
        apply_opd_settings(both)


def test_biased_sampling_warns(tiny, caplog):
    config = _compose(_opd(tiny, "actor_rollout_ref.rollout.temperature=0.7", "actor_rollout_ref.rollout.top_p=0.9"))
    with caplog.at_level(logging.WARNING):
        apply_opd_settings(config)
    assert "rollout.temperature=0.7" in caplog.text and "unbiased estimator" in caplog.text
    assert "top_p=0.9" in caplog.text and "biased" in caplog.text


def test_main_ppo_refuses_bad_teacher_before_starting_anything(tiny, variants, tmp_path):
    """The real command line: a mismatched teacher fails in the driver, before Ray or any model starts."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "verl.trainer.main_ppo",
            "trainer.device=cpu",
            *_opd(tiny, teacher=variants["other_ids"]),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "is not compatible with the student's" in output
    assert "Started a local Ray instance" not in output


def test_trainer_replay_buffer_polls_at_the_opd_interval(tiny):
    """OPD's trainer hook hands verl's own sync replay buffer ``opd.sampler_poll_s`` (verl's default: 2 s)."""
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    from verl_opd.glue.trainer import OPDTrainer

    config = _compose(_opd(tiny, "+opd.sampler_poll_s=0.05"))
    apply_opd_settings(config)
    trainer = OPDTrainer.__new__(OPDTrainer)  # only the hook: no Ray, no workers
    trainer.config, trainer.trainer_mode, trainer.opd = config, "sync", OPDConfig.from_config(config)
    trainer._add_prompts_to_generate = lambda count: None
    buffer = trainer._build_replay_buffer()
    assert type(buffer) is ReplayBuffer
    assert buffer.poll_interval == 0.05
    assert inspect.signature(ReplayBuffer).parameters["poll_interval"].default == 2.0  # what it replaces


def test_relative_teacher_path_reaches_the_trainer_absolute(tiny, monkeypatch):
    """The driver's copy under actor_rollout_ref (what OPDTrainer and the workers read) holds an absolute path.

    Ray's TaskRunner and workers need not share the driver's working directory, so a relative
    ``opd.teacher.model_path`` must not be fingerprinted or loaded relative to theirs.
    """
    monkeypatch.chdir(tiny.teacher.parent)
    config = _compose(_opd(tiny, teacher=tiny.teacher.name))
    apply_opd_settings(config)
    assert config.opd.teacher.model_path == tiny.teacher.name  # the user's node is left as given
    seen_by_trainer = OPDConfig.from_config(config.actor_rollout_ref)
    assert seen_by_trainer.teacher.model_path == str(tiny.teacher)


def test_teacher_of_another_family_needs_its_own_view(tiny, other_teacher):
    """view=student refuses a teacher with another tokenizer, naming view=own; view=own accepts it."""
    with pytest.raises(TokenizerMismatchError, match=r"or set opd.teacher.view=own \(the teacher reads"):
        apply_opd_settings(_compose(_opd(tiny, teacher=other_teacher)))
    config = _compose(
        _opd(
            tiny,
            "+opd.teacher.view=own",
            "+opd.teacher.system_prompt='Grade strictly.'",
            "+opd.teacher.context_key=extra_info.answer",
            teacher=other_teacher,
        )
    )
    apply_opd_settings(config)
    seen_by_workers = OPDConfig.from_config(config.actor_rollout_ref).teacher
    assert (seen_by_workers.view, seen_by_workers.system_prompt) == ("own", "Grade strictly.")
    assert seen_by_workers.context_key == "extra_info.answer"
    # auto shaping: both potentials for a teacher that tokenises differently, none for one that does not
    assert seen_by_workers.shaping == "both"
    same = _compose(_opd(tiny, "+opd.teacher.view=own"))
    apply_opd_settings(same)
    assert OPDConfig.from_config(same.actor_rollout_ref).teacher.shaping == "none"
    explicit = _compose(_opd(tiny, "+opd.teacher.view=own", "+opd.teacher.shaping=teacher", teacher=other_teacher))
    apply_opd_settings(explicit)
    assert OPDConfig.from_config(explicit.actor_rollout_ref).teacher.shaping == "teacher"


def test_own_view_refuses_a_tokenizer_that_is_not_byte_level(tiny, tmp_path):
    """A SentencePiece-style (Metaspace) teacher: refused before any model loads, naming why and the fix."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from verl_opd.tiny.model import build_model

    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "</s>": 1, "▁a": 2, "b": 3}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    teacher = build_model(tmp_path / "sp_teacher", tokenizer, hidden_size=16, num_layers=1, architecture="llama")
    with pytest.raises(TokenizerMismatchError) as error:
        apply_opd_settings(_compose(_opd(tiny, "+opd.teacher.view=own", teacher=teacher)))
    message = str(error.value)
    assert "- teacher tokenizer is byte-level BPE: its pre-tokenizer (['Metaspace']) has no ByteLevel step" in message
    assert "student tokenizer is byte-level BPE" not in message  # the student's is
    assert "with opd.teacher.view=student" in message
