"""Several teachers in the reference slot (issue 13): config, routing, pre-flight refusals, per-teacher pieces.

The end-to-end runs (real ``main_ppo``) are in ``test_e2e_multi_teacher_cpu.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
import socket
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import verl.utils.tensordict_utils as tu
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict

from verl_opd.checks.checkpoint_identity import check_resume_teacher, teacher_identity, write_teacher_identity
from verl_opd.checks.inputs import check_teacher_routing
from verl_opd.config.opd_config import (
    OPDConfig,
    OPDConfigError,
    RoutedTeacherConfig,
    TeacherConfig,
    apply_opd_settings,
)
from verl_opd.core.advantage import opd_token_rewards
from verl_opd.core.metrics import per_teacher_metrics
from verl_opd.core.routing import TeacherRoutes, dotted_field
from verl_opd.glue.teacher_worker import TEACHER_FORWARD_S_FIELD, TEACHER_INDEX_FIELD, TeacherSet

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


ONE_UPDATE = ("data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4")


def test_stock_cli_form_is_parsed_and_reaches_the_workers(tiny, tmp_path):
    config = _compose(
        _two_teachers(tiny, "+opd.teachers.big.kl_coef=2.0", *ONE_UPDATE, data=_mixed_data(tiny, tmp_path))
    )
    apply_opd_settings(config)
    check_teacher_routing(config)
    worker = OPDConfig.from_config(config.actor_rollout_ref)
    assert [name for name, _, _ in worker.teacher_list()] == ["copy", "big"]
    assert worker.teachers["big"] == RoutedTeacherConfig(
        model_path=str(tiny.teacher), data_sources=[SECOND_SOURCE], kl_coef=2.0
    )
    assert worker.teacher_kl_coefs() == [1.0, 2.0]
    # one on-policy update per step, but the on-policy loss takes one kl_coef: the recompute is kept
    assert worker.recompute == "always"


def test_teachers_with_one_kl_coef_may_skip_the_recompute(tiny, tmp_path):
    config = _compose(_two_teachers(tiny, *ONE_UPDATE, data=_mixed_data(tiny, tmp_path)))
    apply_opd_settings(config)
    assert OPDConfig.from_config(config.actor_rollout_ref).recompute == "never"


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


def _teachers(**paths_and_sources) -> OPDConfig:
    """An ``opd.teachers`` config: name=(path, [data_source, ...])."""
    return OPDConfig(
        teachers={
            name: RoutedTeacherConfig(model_path=str(path), data_sources=list(sources))
            for name, (path, sources) in paths_and_sources.items()
        }
    )


def _checkpoint(ckpt, opd: OPDConfig):
    """A ``global_step_1`` folder recording ``opd``'s teachers, the latest of ``ckpt`` (no actor files needed)."""
    write_teacher_identity(str(ckpt / "global_step_1"), teacher_identity(opd))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    return OmegaConf.create({"trainer": {"resume_mode": "auto", "default_local_dir": str(ckpt)}})


def test_checkpoint_records_every_teacher_and_resume_with_the_same_set_passes(tiny, tmp_path, caplog):
    opd = _teachers(copy=(tiny.student_copy, ["openai/gsm8k"]), big=(tiny.teacher, [SECOND_SOURCE]))
    identity = teacher_identity(opd)
    assert list(identity["teachers"]) == ["copy", "big"]
    assert identity["teachers"]["big"]["model_path"] == str(tiny.teacher)
    assert identity["teachers"]["big"]["data_sources"] == [SECOND_SOURCE]
    assert identity["teachers"]["copy"]["fingerprint"] != identity["teachers"]["big"]["fingerprint"]
    resume = _checkpoint(tmp_path / "ckpt", opd)
    check_resume_teacher(resume, opd)  # same teachers: nothing raised
    moved_sources = _teachers(copy=(tiny.student_copy, ["openai/gsm8k", "x"]), big=(tiny.teacher, [SECOND_SOURCE]))
    with caplog.at_level(logging.WARNING):
        check_resume_teacher(resume, moved_sources)
    assert "opd.teachers.copy.data_sources changed: ['openai/gsm8k'] -> ['openai/gsm8k', 'x']" in caplog.text


@pytest.mark.parametrize("change", ["swapped weights", "teacher added", "single teacher"])
def test_resume_with_a_changed_teacher_set_is_refused(tiny, tmp_path, change):
    opd = _teachers(copy=(tiny.student_copy, ["openai/gsm8k"]), big=(tiny.teacher, [SECOND_SOURCE]))
    resume = _checkpoint(tmp_path / "ckpt", opd)
    changed, expected = {
        "swapped weights": (
            _teachers(copy=(tiny.teacher, ["openai/gsm8k"]), big=(tiny.teacher, [SECOND_SOURCE])),
            rf"teacher 'copy': {tiny.student_copy} \(fingerprint \w+\) -> {tiny.teacher}",
        ),
        "teacher added": (
            _teachers(
                copy=(tiny.student_copy, ["openai/gsm8k"]), big=(tiny.teacher, [SECOND_SOURCE]), c=(tiny.teacher, ["c"])
            ),
            r"teachers \['big', 'copy'\] -> \['big', 'c', 'copy'\]",
        ),
        "single teacher": (
            OPDConfig(teacher=TeacherConfig(model_path=str(tiny.teacher))),
            r"teachers \['big', 'copy'\] -> \['teacher'\]",
        ),
    }[change]
    with pytest.raises(
        OPDConfigError, match=rf"Refusing to resume .*global_step_1: it was distilled from other teachers \({expected}"
    ):
        check_resume_teacher(resume, changed)
    # switching on purpose is allowed, and logged
    check_resume_teacher(resume, dataclasses.replace(changed, allow_teacher_change=True))


def test_per_teacher_kl_coef_and_metrics():
    """Each sequence's reward uses its teacher's kl_coef; per-teacher metrics see only that teacher's rows."""
    student = torch.tensor([[-1.0, -2.0], [-1.0, -1.0], [-3.0, -1.0]])
    teacher = torch.tensor([[-1.0, -2.0], [-2.0, -3.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    index = torch.tensor([0, 1, 1])
    rewards = opd_token_rewards(student, teacher, mask, torch.tensor([1.0, 2.0, 2.0])[index])
    assert rewards.tolist() == [[0.0, 0.0], [-2.0, 0.0], [4.0, 0.0]]
    forward_s = torch.tensor([0.5, 0.25, 0.75])  # per row: its teacher's forward on the rank that scored it
    metrics = per_teacher_metrics(student, teacher, mask, rewards, index, ["copy", "big", "idle"], forward_s)
    assert metrics["opd/copy/reverse_kl"] == 0.0 and metrics["opd/copy/samples"] == 1.0
    assert metrics["opd/big/reverse_kl"] == pytest.approx((1.0 - 2.0 + 0.0) / 3)
    assert metrics["opd/big/response_tokens"] == 3.0 and metrics["opd/big/teacher_log_prob"] == pytest.approx(-4 / 3)
    assert metrics["opd/idle/samples"] == 0.0 and "opd/idle/reverse_kl" not in metrics
    # the slowest rank's forward of each teacher; none for a teacher that ran none
    assert metrics["opd/copy/forward_s"] == 0.5 and metrics["opd/big/forward_s"] == 0.75
    assert "opd/idle/forward_s" not in metrics
    with pytest.raises(ValueError, match=r"kl_coef per sequence must have shape \(3,\)"):
        opd_token_rewards(student, teacher, mask, torch.ones(2))


class _FakeTeacher:
    """Stands in for one TeacherWorker: 'log-probs' = input ids + 100 * its number; records what it ran.

    With ``dp_size`` > 1 (torch.distributed initialised, the default group as its data-parallel group) each
    micro-batch runs one all-reduce, as a teacher's FSDP forward all-gathers its weights: a rank that ran fewer
    micro-batches than its peers would leave them waiting (until the group's timeout).
    """

    def __init__(self, number: int, micro: int, dp_size: int = 1) -> None:
        self.number, self.calls, self.device_name = number, [], "cpu"
        self.engine = SimpleNamespace(get_data_parallel_size=lambda: dp_size, get_data_parallel_group=lambda: None)
        self.engine_config = SimpleNamespace(use_dynamic_bsz=False, infer_micro_batch_size_per_gpu=micro)

    def infer_batch(self, data: TensorDict) -> TensorDict:
        micro = tu.get(data, "micro_batch_size_per_gpu")
        self.calls.append((len(data), micro, tu.get(data, "global_token_num")))
        if self.engine.get_data_parallel_size() > 1:
            assert len(data) % micro == 0  # verl's fixed micro-batching asserts it (engine/utils.py:124)
            for _ in range(len(data) // micro):
                torch.distributed.all_reduce(torch.ones(1))
        rows = [ids.float() + 100 * self.number for ids in data["input_ids"].unbind()]
        out = TensorDict(
            {"log_probs": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, batch_size=[len(rows)]
        )
        out.set_non_tensor("metrics", {"loss": float(self.number)})
        return out


def _fake_teacher_set(dp_size: int = 1) -> TeacherSet:
    """A TeacherSet of teachers a (src/a), b (src/b), idle (src/c): its routing and reassembly, fake engines."""
    opd = _teachers(a=("/a", ["src/a"]), b=("/b", ["src/b"]), idle=("/c", ["src/c"]))
    teacher_set = TeacherSet.__new__(TeacherSet)
    teacher_set.names, teacher_set.routes, teacher_set.teacher_field = ["a", "b", "idle"], opd.routes(), None
    teacher_set.workers = [_FakeTeacher(k, micro=2, dp_size=dp_size) for k in range(3)]
    teacher_set._padding_only_shown = set()
    return teacher_set


def _batch(sources: list[str]) -> tuple[TensorDict, list[torch.Tensor]]:
    """A batch whose row r holds r + 1 tokens (the order is visible), with its data_source; micro-batches of 2."""
    rows = [torch.arange(n + 1) for n in range(len(sources))]
    data = TensorDict(
        {"input_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}, batch_size=[len(sources)]
    )
    data["data_source"] = NonTensorStack.from_list(sources)
    tu.assign_non_tensor(data, global_token_num=list(range(1, len(sources) + 1)), micro_batch_size_per_gpu=2)
    return data, rows


def test_teacher_set_scores_each_row_with_its_own_teacher_and_keeps_the_order():
    teacher_set = _fake_teacher_set()
    sources = ["src/b", "src/a", "src/b", "src/b", "src/a"]
    data, rows = _batch(sources)

    out = teacher_set.infer_batch(data)
    expected = [rows[r].float() + 100 * (0 if s == "src/a" else 1) for r, s in enumerate(sources)]
    assert all(torch.equal(got, want) for got, want in zip(out["log_probs"].unbind(), expected, strict=True))
    assert [int(i) for i in out[TEACHER_INDEX_FIELD].unbind()] == [1, 0, 1, 1, 0]
    # each row carries its teacher's forward time on this rank: one value per teacher, > 0
    forward_s = [float(t) for t in out[TEACHER_FORWARD_S_FIELD].unbind()]
    assert forward_s[1] == forward_s[4] > 0 and forward_s[0] == forward_s[2] == forward_s[3] > 0
    # a: its 2 rows in one micro-batch; b: 3 rows at micro 2 -> 2 even micro-batches of 2 (one padded row)
    a_calls, b_calls, idle_calls = (w.calls for w in teacher_set.workers)
    assert a_calls == [(2, 2, [2, 5])] and b_calls == [(4, 2, [1, 3, 4, 1])] and idle_calls == []
    assert out.get("metrics").data == {"a/loss": 0.0, "b/loss": 1.0}
    # opd.teacher_field names a row's teacher over its data_source; rows without it fall back to data_source
    teacher_set.teacher_field = "extra_info.teacher"
    data["extra_info"] = NonTensorStack.from_list([{"teacher": "a"}, {}, {"teacher": "idle"}, {}, {"teacher": "b"}])
    assert teacher_set.teacher_indices(data) == [0, 0, 2, 1, 1]
    teacher_set.teacher_field = None
    data["data_source"] = NonTensorStack.from_list(["src/a", "src/x", "src/a", "src/a", "src/a"])
    with pytest.raises(ValueError, match=r"data_source='src/x' has no teacher among opd.teachers \['a', 'b', 'idle'\]"):
        teacher_set.infer_batch(data)


COLLECTIVE_TIMEOUT_S = 60
# Per rank of two: rank 1 holds no sample of teacher a, so it runs a's forwards on padding rows only.
RANK_SOURCES = (["src/a", "src/b", "src/a", "src/a"], ["src/b", "src/b"])


def _two_rank_teacher_set(rank: int, port: int) -> None:
    """One of two gloo ranks running TeacherSet.infer_batch on its own, uneven share of the batch."""
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        teacher_set = _fake_teacher_set(dp_size=2)
        sources = RANK_SOURCES[rank]
        data, rows = _batch(sources)
        out = teacher_set.infer_batch(data)
        # every rank: a's 3 rows (the most any rank holds) in 2 even micro-batches, b's 2 in one, idle none
        a_calls, b_calls, idle_calls = ([call[:2] for call in w.calls] for w in teacher_set.workers)
        assert (a_calls, b_calls, idle_calls) == ([(4, 2)], [(2, 2)], []), rank
        expected = [rows[r].float() + 100 * (0 if s == "src/a" else 1) for r, s in enumerate(sources)]
        assert all(torch.equal(got, want) for got, want in zip(out["log_probs"].unbind(), expected, strict=True))
        # what the trainer sees: both ranks' rows, concatenated; its per-teacher metrics
        gathered: list = [None, None]
        index = [int(i) for i in out[TEACHER_INDEX_FIELD].unbind()]
        torch.distributed.all_gather_object(
            gathered, (index, [float(t) for t in out[TEACHER_FORWARD_S_FIELD].unbind()])
        )
        index = torch.tensor([i for part, _ in gathered for i in part])
        forward_s = torch.tensor([t for _, part in gathered for t in part])
        zeros = torch.zeros(len(index), 1)
        metrics = per_teacher_metrics(
            zeros, zeros, torch.ones(len(index), 1), zeros, index, teacher_set.names, forward_s
        )
        assert (metrics["opd/a/samples"], metrics["opd/b/samples"], metrics["opd/idle/samples"]) == (3, 3, 0)
        assert metrics["opd/a/forward_s"] > 0 and metrics["opd/b/forward_s"] > 0 and "opd/idle/forward_s" not in metrics
    finally:
        torch.distributed.destroy_process_group()


def test_teacher_set_pads_so_two_ranks_run_each_teacher_equally():
    """Two gloo processes; rank 1 has no sample of teacher a. Without the padding, rank 0's second all-reduce in a's
    forward would wait for a peer that never comes (an error after COLLECTIVE_TIMEOUT_S, not a hang)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(_two_rank_teacher_set, args=(port,), nprocs=2, start_method="fork")
