"""Resume safety (issue 10): the teacher is identified by its weights' bytes, damaged checkpoints are refused.

Checkpoint folders are fabricated with the layout verl 0.9.1 writes
(``verl/utils/checkpoint/fsdp_checkpoint_manager.py`` and ``trainer_base._save_checkpoint``):
``<default_local_dir>/latest_checkpointed_iteration.txt`` holding the step number, and
``global_step_N/{data.pt, actor/{model,optim,extra_state}_world_size_W_rank_R.pt, actor/huggingface/}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from verl_opd.checks.checkpoint_identity import (
    FINGERPRINT_SCHEME,
    HEAD_BYTES,
    IDENTITY_FILE,
    RANGE_BYTES,
    RANGE_COUNT,
    check_resume_teacher,
    sampled_ranges,
    teacher_fingerprint,
    teacher_identity,
    write_teacher_identity,
)
from verl_opd.config.opd_config import OPDConfig, OPDConfigError, TeacherConfig

ACTOR_FILES = ("model", "optim", "extra_state")


@pytest.fixture(scope="module")
def teachers(tiny, tmp_path_factory) -> dict[str, Path]:
    """``same_shape``: tiny.teacher's architecture with other weights; ``moved``: a byte copy of tiny.teacher."""
    from verl_opd.tiny.model import build_model

    root = tmp_path_factory.mktemp("teachers")
    same_shape = build_model(root / "same_shape", tiny.root / "tokenizer", hidden_size=64, num_layers=2, seed=3)
    moved = root / "moved"
    shutil.copytree(tiny.teacher, moved)
    return {"same_shape": Path(same_shape), "moved": moved}


def _opd(teacher: Path, dtype: str = "float32", **settings) -> OPDConfig:
    return OPDConfig(teacher=TeacherConfig(model_path=str(teacher), dtype=dtype), **settings)


def _resume(ckpt: Path, mode: str = "auto", path: Path | None = None):
    return OmegaConf.create(
        {"trainer": {"resume_mode": mode, "default_local_dir": str(ckpt), "resume_from_path": str(path)}}
    )


def _save_step(ckpt: Path, step: int, teacher: Path | None = None) -> Path:
    """A ``global_step_<step>`` folder as verl writes it (one rank), recorded as the latest step."""
    step_dir = ckpt / f"global_step_{step}"
    actor = step_dir / "actor"
    (actor / "huggingface").mkdir(parents=True)
    for name in ACTOR_FILES:
        torch.save({"weight": torch.arange(4096, dtype=torch.float32)}, actor / f"{name}_world_size_1_rank_0.pt")
    torch.save({"epoch": 0}, step_dir / "data.pt")
    (actor / "huggingface" / "config.json").write_text("{}")
    if teacher is not None:
        write_teacher_identity(str(step_dir), teacher_identity(_opd(teacher)))
    (ckpt / "latest_checkpointed_iteration.txt").write_text(str(step))
    return step_dir


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_shape_teacher_with_other_weights_is_refused(tiny, teachers, tmp_path):
    """The reported case: a retrained teacher of the same architecture used to pass as the same teacher."""
    same_shape = teachers["same_shape"]
    assert (same_shape / "config.json").read_bytes() == (tiny.teacher / "config.json").read_bytes()
    # scheme 1 (names and sizes) cannot tell them apart; scheme 2 reads the weights
    assert teacher_fingerprint(str(same_shape), scheme=1) == teacher_fingerprint(str(tiny.teacher), scheme=1)
    assert teacher_fingerprint(str(same_shape)) != teacher_fingerprint(str(tiny.teacher))

    ckpt = tmp_path / "ckpt"
    _save_step(ckpt, 2, teacher=tiny.teacher)
    with pytest.raises(OPDConfigError) as error:
        check_resume_teacher(_resume(ckpt), _opd(same_shape))
    message = str(error.value)
    assert f"Refusing to resume {ckpt / 'global_step_2'}: it was distilled from teacher {tiny.teacher}" in message
    assert "opd.teacher.model_path" in message and "opd.allow_teacher_change=True" in message


def test_identical_copy_elsewhere_is_the_same_teacher(tiny, teachers, tmp_path, caplog):
    moved = teachers["moved"]
    assert teacher_fingerprint(str(moved)) == teacher_fingerprint(str(tiny.teacher))
    ckpt = tmp_path / "ckpt"
    _save_step(ckpt, 2, teacher=tiny.teacher)
    with caplog.at_level(logging.WARNING):
        check_resume_teacher(_resume(ckpt), _opd(moved))
    assert f"the teacher moved ({tiny.teacher} -> {moved}), same fingerprint" in caplog.text


def test_identity_file_records_the_fingerprint_scheme(tiny, tmp_path):
    path = write_teacher_identity(str(tmp_path), teacher_identity(_opd(tiny.teacher, kl_coef=0.5)))
    identity = json.loads(Path(path).read_text())
    assert identity["fingerprint_scheme"] == FINGERPRINT_SCHEME == 2
    assert identity["fingerprint"] == teacher_fingerprint(str(tiny.teacher))
    assert identity["kl_coef"] == 0.5 and identity["dtype"] == "float32"


def test_large_weight_file_is_sampled_not_read_whole(tmp_path):
    """A 1 GiB (sparse) weight file: bytes inside a sampled range count, bytes between two ranges do not."""
    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    size = 1 << 30
    with open(weights, "wb") as f:
        f.truncate(size)
    ranges = sampled_ranges(size)
    assert len(ranges) == 1 + RANGE_COUNT and ranges[0] == (0, HEAD_BYTES)
    assert ranges[-1][0] + ranges[-1][1] == size  # the last range ends at the end of the file
    assert sum(length for _, length in ranges) == HEAD_BYTES + RANGE_COUNT * RANGE_BYTES  # 9 MiB of 1 GiB
    assert sampled_ranges(1000) == [(0, 1000)]  # small files are hashed whole

    def flip(offset: int) -> str:
        with open(weights, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01")
        return teacher_fingerprint(str(model))

    base = teacher_fingerprint(str(model))
    gap_start = ranges[5][0] + RANGE_BYTES
    assert gap_start + 100 < ranges[6][0]
    # A change outside every sampled range leaves the fingerprint as it was: the documented blind spot
    # that keeps a 64 GB teacher's fingerprint at about 130 MiB of reads.
    assert flip(gap_start + 100) == base
    inside = flip(ranges[6][0] + 100)
    assert inside != base
    assert flip(HEAD_BYTES // 2) not in (base, inside)  # the head (a safetensors header) is hashed too


def test_changed_opd_settings_are_logged_on_resume(tiny, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    _save_step(ckpt, 2, teacher=tiny.teacher)  # kl_coef 1.0, discount 0.0, task_reward_coef 0.0, float32
    with caplog.at_level(logging.WARNING):
        check_resume_teacher(_resume(ckpt), _opd(tiny.teacher, kl_coef=0.5, dtype="bfloat16", discount=0.9))
    assert "opd.kl_coef changed: 1.0 -> 0.5" in caplog.text
    assert "opd.teacher.dtype changed: float32 -> bfloat16" in caplog.text
    assert "opd.discount changed: 0.0 -> 0.9" in caplog.text
    assert "opd.task_reward_coef" not in caplog.text  # unchanged: not logged


def test_records_of_the_first_scheme_are_still_checked(tiny, teachers, tmp_path, caplog):
    """opd_teacher.json written before the scheme was recorded: compared by names and sizes, with a warning."""
    ckpt = tmp_path / "ckpt"
    step_dir = _save_step(ckpt, 2)
    record = {"model_path": str(tiny.teacher), "fingerprint": teacher_fingerprint(str(tiny.teacher), scheme=1)}
    (step_dir / IDENTITY_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        check_resume_teacher(_resume(ckpt), _opd(tiny.teacher))
    assert "records a scheme-1 teacher fingerprint" in caplog.text
    with pytest.raises(OPDConfigError, match="Refusing to resume"):
        check_resume_teacher(_resume(ckpt), _opd(tiny.student))  # another architecture: other sizes

    record["fingerprint_scheme"] = 99
    (step_dir / IDENTITY_FILE).write_text(json.dumps(record))
    with pytest.raises(OPDConfigError, match=r"fingerprint scheme 99, which this verl-opd does not know"):
        check_resume_teacher(_resume(ckpt), _opd(tiny.teacher))


@pytest.mark.parametrize("damaged", ["actor/model_world_size_1_rank_0.pt", "data.pt", "actor/huggingface/model"])
def test_truncated_latest_step_is_refused_and_the_previous_one_named(tiny, tmp_path, damaged):
    ckpt = tmp_path / "ckpt"
    good = _save_step(ckpt, 1, teacher=tiny.teacher)
    latest = _save_step(ckpt, 2, teacher=tiny.teacher)
    if damaged.endswith("/model"):  # a Hugging Face export (checkpoint.save_contents with hf_model)
        damaged += ".safetensors"
        save_file({"weight": torch.zeros(4096)}, latest / damaged)
    target = latest / damaged
    _truncate(target)
    if target.suffix == ".pt":
        with pytest.raises((RuntimeError, OSError)):  # what verl would meet later, deep in the run
            torch.load(target, weights_only=False)
    before = _snapshot(ckpt)

    with pytest.raises(OPDConfigError) as error:
        check_resume_teacher(_resume(ckpt), _opd(tiny.teacher))
    message = str(error.value)
    assert f"Refusing to resume {latest}: {target} (not a complete" in message
    assert f"trainer.resume_mode=resume_path trainer.resume_from_path={good}," in message
    assert "trainer.resume_mode=disable" in message
    assert _snapshot(ckpt) == before  # nothing deleted or modified


def test_truncated_step_without_an_intact_predecessor(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = _save_step(ckpt, 1, teacher=tiny.teacher)
    _truncate(first / "actor" / "optim_world_size_1_rank_0.pt")  # damaged too: not offered
    shutil.rmtree(_save_step(ckpt, 3, teacher=tiny.teacher) / "actor")  # no student: not offered
    latest = _save_step(ckpt, 5, teacher=tiny.teacher)
    _truncate(latest / "actor" / "model_world_size_1_rank_0.pt", keep=0.0)
    with pytest.raises(OPDConfigError) as error:
        check_resume_teacher(_resume(ckpt), _opd(tiny.teacher))
    message = str(error.value)
    assert "No earlier intact checkpoint was found beside it" in message
    assert "resume_from_path" not in message

    # resume_path: the folder given is checked, and an intact earlier step beside it is offered
    intact = _save_step(ckpt, 4, teacher=tiny.teacher)
    with pytest.raises(OPDConfigError, match=f"trainer.resume_from_path={intact},"):
        check_resume_teacher(_resume(ckpt, "resume_path", latest), _opd(tiny.teacher))


@pytest.mark.parametrize(
    ("content", "problem"),
    [('{"model_path": "/t", "finger', "not valid JSON"), ("{}", "no model_path or fingerprint in it")],
)
def test_damaged_teacher_record_is_refused(tiny, tmp_path, caplog, content, problem):
    ckpt = tmp_path / "ckpt"
    good = _save_step(ckpt, 1, teacher=tiny.teacher)
    latest = _save_step(ckpt, 2)
    record = latest / IDENTITY_FILE
    record.write_text(content)
    with pytest.raises(OPDConfigError) as error:
        check_resume_teacher(_resume(ckpt), _opd(tiny.teacher))
    message = str(error.value)
    assert f"its teacher record {record} is damaged ({problem}" in message
    assert f"trainer.resume_from_path={good}," in message and "opd.allow_teacher_change=True" in message
    assert record.read_text() == content

    with caplog.at_level(logging.WARNING):
        check_resume_teacher(_resume(ckpt), _opd(tiny.teacher, allow_teacher_change=True))
    assert "opd.allow_teacher_change=True: Refusing to resume" in caplog.text


def test_main_ppo_refuses_a_same_shape_teacher_before_ray(tiny, teachers, cpu_args, main_ppo, tmp_path):
    """The real command line, against a fabricated checkpoint: refused in the driver, before Ray starts."""
    ckpt = tmp_path / "ckpt"
    write_teacher_identity(str(ckpt / "global_step_2"), teacher_identity(_opd(tiny.teacher)))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    args = cpu_args(tiny, steps=4) + [
        "algorithm.adv_estimator=opd",
        f"+opd.teacher.model_path={teachers['same_shape']}",
        f"trainer.default_local_dir={ckpt}",
        "trainer.resume_mode=auto",
    ]
    run = main_ppo(args, cwd=tmp_path)
    assert run.returncode != 0
    assert f"OPDConfigError: Refusing to resume {ckpt / 'global_step_2'}" in run.output, run.tail()
    assert "opd.teacher.model_path" in run.output
    assert "Started a local Ray instance" not in run.output
