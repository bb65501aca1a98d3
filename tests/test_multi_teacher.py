"""Several teachers in the reference slot (issue 13): config, routing, pre-flight refusals, per-teacher pieces.

The end-to-end runs (real ``main_ppo``) are in ``test_e2e_multi_teacher_cpu.py``.
"""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from verl_opd.checks.inputs import check_teacher_routing
from verl_opd.config.opd_config import OPDConfig, OPDConfigError, RoutedTeacherConfig, apply_opd_settings
from verl_opd.core.routing import TeacherRoutes, dotted_field

SECOND_SOURCE = "lighteval/MATH"


def _compose(overrides: list[str]):
    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose("ppo_trainer", overrides=overrides)


def _two_teachers(tiny, *extra: str, data=None) -> list[str]:
    """Stock CLI form: a copy of the student for gsm8k, the tiny teacher for MATH."""
    data = data or tiny.data
    return [
        "algorithm.adv_estimator=opd",
        f"actor_rollout_ref.model.path={tiny.student}",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'test.parquet'}",
        f"+opd.teachers.copy.model_path={tiny.student_copy}",
        "+opd.teachers.copy.data_sources=[openai/gsm8k]",
        f"+opd.teachers.big.model_path={tiny.teacher}",
        f"+opd.teachers.big.data_sources=[{SECOND_SOURCE}]",
        *extra,
    ]


def _mixed_data(tiny, out, sources=("openai/gsm8k", SECOND_SOURCE), teacher_names=None):
    """The tiny data with its rows' data_source cycling through ``sources`` (and optional extra_info.teacher)."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        frame = pd.read_parquet(tiny.data / f"{split}.parquet")
        frame["data_source"] = [sources[i % len(sources)] for i in range(len(frame))]
        if teacher_names is not None:
            frame["extra_info"] = [
                {**info, "teacher": teacher_names[i % len(teacher_names)]} for i, info in enumerate(frame["extra_info"])
            ]
        frame.to_parquet(out / f"{split}.parquet", index=False)
    return out


def test_stock_cli_form_is_parsed_and_reaches_the_workers(tiny, tmp_path):
    config = _compose(_two_teachers(tiny, "+opd.teachers.big.kl_coef=2.0", data=_mixed_data(tiny, tmp_path)))
    apply_opd_settings(config)
    check_teacher_routing(config)
    worker = OPDConfig.from_config(config.actor_rollout_ref)
    assert [name for name, _, _ in worker.teacher_list()] == ["copy", "big"]
    assert worker.teachers["big"] == RoutedTeacherConfig(
        model_path=str(tiny.teacher), data_sources=[SECOND_SOURCE], kl_coef=2.0
    )
    assert worker.teacher_kl_coefs() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["+opd.teacher.model_path=/x"], r"Both opd.teacher \(opd.teacher.model_path\) and opd.teachers"),
        (["+opd.teachers.big.data_sources=[openai/gsm8k]"], None),  # replaced below by a duplicate
        (["+opd.teachers.big.view=own"], r"opd.teachers.big.view='own': several teachers score"),
        (["+opd.teachers.big.kl_coef=-1"], r"opd.teachers.big.kl_coef=-1 must be a finite number > 0"),
        (["+opd.teachers.big.dtype=int8"], r"opd.teachers.big.dtype='int8'; use one of"),
        (["+opd.teachers.big.colour=red"], r"Unknown opd keys \['opd.teachers.big.colour'\]"),
        (["+opd.teacher_field=extra_info."], r"opd.teacher_field='extra_info.' must be a dotted dataset field"),
    ],
)
def test_bad_teacher_sets_are_refused_naming_the_key(tiny, extra, expected):
    overrides = _two_teachers(tiny, *extra)
    if expected is None:  # a data_source listed by two teachers
        overrides = [o for o in overrides if not o.startswith("+opd.teachers.big.data_sources")] + extra
        expected = r"data_source 'openai/gsm8k' is listed by both opd.teachers.copy.data_sources and opd.teachers.big"
    with pytest.raises(OPDConfigError, match=expected):
        apply_opd_settings(_compose(overrides))


def test_teacher_without_data_sources_or_field_is_refused(tiny):
    overrides = [o for o in _two_teachers(tiny) if not o.startswith("+opd.teachers.big.data_sources")]
    with pytest.raises(OPDConfigError, match=r"opd.teachers.big.data_sources is empty, so teacher 'big' would score"):
        apply_opd_settings(_compose(overrides))
    with pytest.raises(OPDConfigError, match=r"opd.teachers.a.data_sources='openai/gsm8k' must be a list of strings"):
        OPDConfig.from_config(
            OmegaConf.create({"opd": {"teachers": {"a": {"data_sources": "openai/gsm8k"}}}})
        ).validate()


def test_teacher_field_without_teachers_is_refused(tiny):
    config = _compose(
        [
            "algorithm.adv_estimator=opd",
            f"actor_rollout_ref.model.path={tiny.student}",
            f"+opd.teacher.model_path={tiny.teacher}",
            "+opd.teacher_field=extra_info.teacher",
        ]
    )
    with pytest.raises(OPDConfigError, match=r"opd.teacher_field='extra_info.teacher' names each sample's teacher"):
        apply_opd_settings(config)


def test_every_teacher_tokenizer_is_checked(tiny, tmp_path):
    """The second teacher's tokenizer is compared with the student's too (here: a swapped chat template)."""
    other = tmp_path / "other_template"
    shutil.copytree(tiny.teacher, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    overrides = [o for o in _two_teachers(tiny) if not o.startswith("+opd.teachers.big.model_path")]
    with pytest.raises(Exception, match=r"chat template"):
        apply_opd_settings(_compose([*overrides, f"+opd.teachers.big.model_path={other}"]))


def test_routing_rule():
    routes = TeacherRoutes.of({"math": ["openai/gsm8k"], "code": ["code/x", "code/y"]})
    assert [routes.index(s) for s in ("openai/gsm8k", "code/y", "other")] == [0, 1, None]
    # a named teacher takes precedence over data_source; an unknown name never falls back
    assert routes.index("openai/gsm8k", "code") == 1 and routes.index("openai/gsm8k", "nobody") is None
    samples = [("openai/gsm8k", None), ("other", None), ("code/x", "ghost"), ("other", None)]
    assert routes.uncovered(samples) == (["other"], ["ghost"])
    assert dotted_field({"extra_info": {"teacher": "math"}}, "extra_info.teacher") == "math"
    assert dotted_field({"extra_info": {"index": 3}}, "extra_info.teacher") is None
    assert dotted_field({"extra_info": None}, "extra_info.teacher") is None


def test_uncovered_data_source_is_refused_naming_it(tiny, tmp_path):
    data = _mixed_data(tiny, tmp_path, sources=("openai/gsm8k", SECOND_SOURCE, "code/apps"))
    config = _compose(_two_teachers(tiny, data=data))
    with pytest.raises(OPDConfigError, match=r"data_source values \['code/apps'\] that no teacher scores") as error:
        check_teacher_routing(config)
    assert "train.parquet" in str(error.value) and "+opd.teachers.copy.data_sources=" in str(error.value)


def test_teacher_field_names_are_checked_and_take_precedence(tiny, tmp_path):
    # every row names a teacher: a data_source no teacher lists is then fine
    data = _mixed_data(tiny, tmp_path / "ok", sources=("code/apps",), teacher_names=("copy", "big"))
    check_teacher_routing(_compose(_two_teachers(tiny, "+opd.teacher_field=extra_info.teacher", data=data)))
    data = _mixed_data(tiny, tmp_path / "bad", teacher_names=("copy", "ghost"))
    config = _compose(_two_teachers(tiny, "+opd.teacher_field=extra_info.teacher", data=data))
    with pytest.raises(OPDConfigError, match=r"names teachers \['ghost'\] in extra_info.teacher"):
        check_teacher_routing(config)
