"""The ``opd`` config node, and what ``algorithm.adv_estimator=opd`` turns on in verl.

``opd`` is a top-level node of the Hydra config (verl never converts it to one of
its dataclasses), read into :class:`OPDConfig`. :func:`apply_opd_settings` runs in
the driver, before verl validates the config and before any model is loaded: it
checks the teacher, refuses settings that would silently train against the wrong
thing, and sets the verl keys OPD needs, logging each change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from verl_opd.core.routing import TeacherRoutes

logger = logging.getLogger(__name__)

TRAINER_MODE = "opd"
TEACHER_DTYPES = ("float32", "bfloat16")
# opd.teacher.view: "student" scores the student's own token ids (one tokenizer, one chat template); "own" lets
# the teacher read the conversation in its own chat template and tokenizer (verl_opd.teacher_view).
VIEW_STUDENT, VIEW_OWN = "student", "own"
TEACHER_VIEWS = (VIEW_STUDENT, VIEW_OWN)
# opd.teacher.shaping (view=own): the boundary-lookahead potentials added to each chunk's log-ratio
# (verl_opd.core.xtok_shaping). "auto" resolves to "both" when the teacher tokenises differently from the
# student and to "none" when it tokenises identically (every chunk is one token: there is no lookahead).
SHAPING_AUTO, SHAPING_NONE, SHAPING_TEACHER, SHAPING_BOTH = "auto", "none", "teacher", "both"
SHAPINGS = (SHAPING_AUTO, SHAPING_NONE, SHAPING_TEACHER, SHAPING_BOTH)
# The sequence-parallel sizes the teacher's and the student's forwards run with: the shaping's logits hook sees one
# shard of a sequence's logits under Ulysses and cannot label it (verl_opd.glue.shaping).
# The reference slot's pair is also what checks.teacher_fit reads for the teacher's heads.
REF_SP_KEYS = (
    "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
    "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size",
)
SP_KEYS = (
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
    "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
    *REF_SP_KEYS,
)
# Where the driver copies data.apply_chat_template_kwargs for the workers (they receive actor_rollout_ref
# only): the teacher's own view renders its prompt with the same kwargs verl rendered the student's with.
CHAT_TEMPLATE_KWARGS_KEY = "opd_chat_template_kwargs"
PRECISION_NAMES = {"float32": "fp32", "bfloat16": "bf16"}
# opd.precision: "auto" resolves to "fp32" with trainer.device=cpu, else "bf16" (see resolve_precision).
PRECISIONS = ("auto", "fp32", "bf16")
ATTN_KEY = "actor_rollout_ref.model.override_config.attn_implementation"
# verl's attention when ATTN_KEY is unset (verl/workers/config/model.py:185).
VERL_DEFAULT_ATTN = "flash_attention_2"
LEGACY_TEACHER_KEY = "actor_rollout_ref.ref.model.path"
# opd.recompute: "auto" resolves to "never" where skipping verl's old_log_prob recompute is exact, else "always".
RECOMPUTE_MODES = ("auto", "always", "never")
# The policy loss that takes the student side of the advantage from the update's own forward (glue/policy_loss.py).
ONPOLICY_LOSS = "opd_onpolicy"
LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
# opd.teachers.<name>: a name becomes part of metric keys (opd/<name>/reverse_kl) and of checkpoint records.
_TEACHER_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Per-teacher metric keys would shadow the global ones under these names.
_RESERVED_TEACHER_NAMES = frozenset({"xtok"})


# How an error message names the types the opd dataclasses' fields are annotated with.
_TYPE_WORDS = {bool: "true or false", float: "a number", str: "a string", type(None): "null"}
_Node = typing.TypeVar("_Node")


class OPDConfigError(ValueError):
    """A configuration that OPD refuses; the message names the problem and the fix."""


@dataclass(frozen=True)
class TeacherConfig:
    """Where the teacher comes from and how it is held.

    ``dtype`` is how the teacher's weights are stored (verl's ``fsdp_config.model_dtype``), not
    what it computes in: that is ``opd.precision`` for both models. ``bfloat16`` halves the
    teacher's memory; with ``opd.precision=fp32`` it then computes in fp32 on bf16-rounded weights.

    ``offload=False`` keeps the teacher's weights resident on the accelerator (fast,
    costs its memory); ``True`` is verl's reference-model behaviour: weights live in
    pinned host memory and stream to the GPU at every forward (slow, saves memory).

    ``view`` is what the teacher reads: ``student`` (the student's token ids, so both must share one
    tokenizer and chat template) or ``own`` (the conversation in the teacher's own chat template and
    tokenizer, its log-probs mapped back onto the student's tokens on bytes). With ``own`` only,
    ``system_prompt`` is a system message only the teacher reads, and ``context_key`` a dotted dataset
    field (``extra_info.solution``) whose text only the teacher reads (:mod:`verl_opd.teacher_view.render`).
    ``shaping`` (own view only) removes the boundary lookahead from each chunk's log-ratio: ``teacher`` adds
    the teacher's potential, ``both`` the student's too (one more student forward per step; exact for a
    byte-identical teacher), ``none`` neither, ``auto`` is ``both`` for a teacher that tokenises differently
    and ``none`` for one that tokenises like the student (:func:`resolve_shaping`).
    """

    model_path: str | None = None
    dtype: str = "float32"
    offload: bool = False
    view: str = VIEW_STUDENT
    system_prompt: str | None = None
    context_key: str | None = None
    shaping: str = SHAPING_AUTO


@dataclass(frozen=True)
class RoutedTeacherConfig(TeacherConfig):
    """One of several teachers, ``opd.teachers.<name>``: a :class:`TeacherConfig` plus what it scores.

    ``data_sources``: the verl ``data_source`` values of the samples this teacher scores (each value
    belongs to one teacher). ``kl_coef``: this teacher's ``opd.kl_coef`` (null: the global one).
    A dataset field named by ``opd.teacher_field`` overrides ``data_sources`` per sample.
    """

    data_sources: list[str] = field(default_factory=list)
    kl_coef: float | None = None


@dataclass(frozen=True)
class OPDConfig:
    """OPD's knobs (see ``opd-spec``): ``r_t = -kl_coef * (log pi_S - log pi_T)``, discounted by ``discount``,
    plus ``task_reward_coef * (R - group mean R)`` on every response token."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Several teachers in the reference slot, by name (opd.teacher is then left unset), and the dotted
    # dataset field (extra_info.teacher) that names a sample's teacher, taking precedence over data_source.
    teachers: dict[str, RoutedTeacherConfig] = field(default_factory=dict)
    teacher_field: str | None = None
    # Compute precision of both models (spec rule 10); one of PRECISIONS, see resolve_precision.
    precision: str = "auto"
    kl_coef: float = 1.0
    discount: float = 0.0
    task_reward_coef: float = 0.0
    check_tokenizers: bool = True
    allow_teacher_change: bool = False
    # verl's sync replay buffer looks for a finished batch every 2 s, so a step's generation phase lasts a
    # whole number of 2-s ticks; OPD's trainer looks this often instead (see OPDTrainer._build_replay_buffer).
    sampler_poll_s: float = 0.2
    # verl's old_log_prob recompute: one of RECOMPUTE_MODES, see resolve_recompute.
    recompute: str = "auto"

    @classmethod
    def from_config(cls, config: DictConfig) -> OPDConfig:
        """Read the ``opd`` node of a verl config (defaults where absent); unknown keys are refused."""
        node = OmegaConf.select(config, "opd")
        values = OmegaConf.to_container(node, resolve=True) if node is not None else {}
        return _build(cls, values, "opd")

    def teacher_list(self) -> list[tuple[str, str, TeacherConfig]]:
        """``(name, config key, settings)`` of every teacher: ``opd.teachers``' in order, or ``opd.teacher``."""
        if self.teachers:
            return [(name, f"opd.teachers.{name}", teacher) for name, teacher in self.teachers.items()]
        return [("teacher", "opd.teacher", self.teacher)]

    def routes(self) -> TeacherRoutes:
        """Which teacher of ``opd.teachers`` scores which ``data_source`` (see :mod:`verl_opd.core.routing`)."""
        return TeacherRoutes.of({name: teacher.data_sources for name, teacher in self.teachers.items()})

    def teacher_kl_coefs(self) -> list[float]:
        """Each teacher's KL coefficient, in :meth:`teacher_list` order (a teacher's own, else ``opd.kl_coef``)."""
        return [getattr(t, "kl_coef", None) or self.kl_coef for _, _, t in self.teacher_list()]

    def validate(self) -> None:
        """Raise :class:`OPDConfigError` for values of the wrong type or that the math does not allow."""
        _check_types(self, "opd")
        if self.teachers:
            self._validate_teacher_set()
        elif self.teacher_field is not None:
            raise OPDConfigError(
                f"opd.teacher_field={self.teacher_field!r} names each sample's teacher among opd.teachers.<name>, "
                "but no opd.teachers are given: add them, or remove opd.teacher_field."
            )
        for _, key, teacher in self.teacher_list():
            _validate_teacher(teacher, key)
        if self.precision not in PRECISIONS:
            raise OPDConfigError(
                f"opd.precision={self.precision!r}; use one of {PRECISIONS} (auto: fp32 with trainer.device=cpu, "
                "else bf16 with fp32 log-probs)."
            )
        if not (math.isfinite(self.kl_coef) and self.kl_coef > 0):
            raise OPDConfigError(f"opd.kl_coef={self.kl_coef} must be a finite number > 0.")
        if not 0.0 <= self.discount <= 1.0:
            raise OPDConfigError(f"opd.discount={self.discount} must be in [0, 1] (0 = per-token, the default).")
        if not (math.isfinite(self.task_reward_coef) and self.task_reward_coef >= 0):
            raise OPDConfigError(f"opd.task_reward_coef={self.task_reward_coef} must be a finite number >= 0.")
        if self.recompute not in RECOMPUTE_MODES:
            raise OPDConfigError(
                f"opd.recompute={self.recompute!r}; use one of {RECOMPUTE_MODES} (auto: skip verl's old_log_prob "
                "recompute where that is exact, always: keep it, never: skip it or refuse the run)."
            )
        if not (math.isfinite(self.sampler_poll_s) and self.sampler_poll_s > 0):
            raise OPDConfigError(
                f"opd.sampler_poll_s={self.sampler_poll_s} must be a finite number of seconds > 0 (default 0.2)."
            )

    def _validate_teacher_set(self) -> None:
        """``opd.teachers``: not mixed with ``opd.teacher``, usable names, each ``data_source`` owned once."""
        given = [f"opd.teacher.{f.name}" for f in dataclasses.fields(TeacherConfig) if _differs(self.teacher, f)]
        if given:
            raise OPDConfigError(
                f"Both opd.teacher ({', '.join(given)}) and opd.teachers ({', '.join(self.teachers)}) are given. "
                "opd.teacher is the one-teacher shorthand: remove it, or move it under opd.teachers.<name>."
            )
        owner: dict[str, str] = {}
        for name, teacher in self.teachers.items():
            key = f"opd.teachers.{name}"
            if not _TEACHER_NAME.fullmatch(name) or name in _RESERVED_TEACHER_NAMES:
                raise OPDConfigError(
                    f"{key}: a teacher's name becomes part of metric keys (opd/<name>/reverse_kl); use letters, "
                    f"digits, '_' or '-', and none of {sorted(_RESERVED_TEACHER_NAMES)}."
                )
            if teacher.view != VIEW_STUDENT:
                raise OPDConfigError(
                    f"{key}.view={teacher.view!r}: several teachers score the student's token ids only "
                    f"(view={VIEW_STUDENT}); a teacher that reads its own view must be the only one (opd.teacher.*)."
                )
            if not teacher.data_sources and self.teacher_field is None:
                raise OPDConfigError(
                    f"{key}.data_sources is empty, so teacher {name!r} would score no sample. Give it the data_source "
                    f'values it scores ("+{key}.data_sources=[openai/gsm8k]"), or name teachers per sample with '
                    "opd.teacher_field=extra_info.teacher."
                )
            for source in teacher.data_sources:
                if source in owner:
                    raise OPDConfigError(
                        f"data_source {source!r} is listed by both opd.teachers.{owner[source]}.data_sources and "
                        f"{key}.data_sources; each data_source is scored by one teacher: keep it in one list."
                    )
                owner[source] = name
            if teacher.kl_coef is not None and not (math.isfinite(teacher.kl_coef) and teacher.kl_coef > 0):
                raise OPDConfigError(f"{key}.kl_coef={teacher.kl_coef} must be a finite number > 0 (or null).")
        field_key = self.teacher_field
        if field_key is not None and not all(part.strip() for part in field_key.split(".")):
            raise OPDConfigError(
                f"opd.teacher_field={field_key!r} must be a dotted dataset field such as extra_info.teacher."
            )


def _differs(teacher: TeacherConfig, spec: dataclasses.Field) -> bool:
    """Whether ``teacher``'s field ``spec`` was given a value other than its default."""
    return getattr(teacher, spec.name) != spec.default


def _validate_teacher(teacher: TeacherConfig, key: str) -> None:
    """One teacher's settings at config key ``key`` (``opd.teacher`` or ``opd.teachers.<name>``)."""
    if not teacher.model_path:
        raise OPDConfigError(
            f"algorithm.adv_estimator=opd needs a teacher: set {key}.model_path=<path to the teacher model> "
            f"(with the stock verl config: +{key}.model_path=...)."
        )
    if not os.path.isfile(os.path.join(teacher.model_path, "config.json")):
        raise OPDConfigError(
            f"{key}.model_path={teacher.model_path!r} is not a readable Hugging Face model directory "
            "(no config.json there). Point it at a local directory saved with save_pretrained."
        )
    if teacher.dtype not in TEACHER_DTYPES:
        raise OPDConfigError(
            f"{key}.dtype={teacher.dtype!r}; use one of {TEACHER_DTYPES}. It sets how the teacher's "
            "weights are stored; what both models compute in is opd.precision (auto, fp32 or bf16)."
        )
    if teacher.view not in TEACHER_VIEWS:
        raise OPDConfigError(
            f"{key}.view={teacher.view!r}; use one of {TEACHER_VIEWS} (student: the teacher scores the "
            "student's token ids; own: it reads the conversation in its own chat template and tokenizer)."
        )
    if teacher.shaping not in SHAPINGS:
        raise OPDConfigError(
            f"{key}.shaping={teacher.shaping!r}; use one of {SHAPINGS} (the boundary-lookahead shaping of "
            f"{key}.view={VIEW_OWN}: auto, none, teacher-side only, or both sides)."
        )
    if teacher.view == VIEW_STUDENT and teacher.shaping not in (SHAPING_AUTO, SHAPING_NONE):
        raise OPDConfigError(
            f"{key}.shaping={teacher.shaping} shapes chunks of two tokenisations, which only the teacher's own view "
            f"has: set {key}.view={VIEW_OWN}, or remove {key}.shaping (the student's tokens need none)."
        )
    for name in ("system_prompt", "context_key"):
        if teacher.view == VIEW_STUDENT and getattr(teacher, name) is not None:
            raise OPDConfigError(
                f"{key}.{name} is read only when the teacher reads its own view of the conversation: "
                f"set {key}.view={VIEW_OWN}, or remove {key}.{name}."
            )
    context = teacher.context_key
    if context is not None and not all(part.strip() for part in context.split(".")):
        raise OPDConfigError(
            f"{key}.context_key={context!r} must be a dotted dataset field such as extra_info.solution."
        )


def _field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field names and their annotated types (resolved: this module postpones annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type[_Node], values: Any, prefix: str) -> _Node:
    """Build dataclass ``cls`` from the config mapping at ``prefix``, refusing keys it does not have."""
    types = _field_types(cls)
    valid = sorted(_key_pattern(prefix, name, kind) for name, kind in types.items())
    if not isinstance(values, dict):
        raise OPDConfigError(f"{prefix}={values!r} must be a mapping with the keys {valid}.")
    unknown = sorted(f"{prefix}.{name}" for name in set(values) - set(types))
    if unknown:
        raise OPDConfigError(f"Unknown opd keys {unknown}; valid keys: {valid}.")
    kwargs = {}
    for name, value in values.items():
        kind = types[name]
        if dataclasses.is_dataclass(kind):
            # a null node (``teacher:`` with nothing under it in YAML) means that node's defaults
            value = _build(kind, {} if value is None else value, f"{prefix}.{name}")
        elif typing.get_origin(kind) is dict:
            value = _build_named(typing.get_args(kind)[1], value, f"{prefix}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _key_pattern(prefix: str, name: str, kind: Any) -> str:
    """How an error message lists a valid key: ``opd.kl_coef``, ``opd.teacher.*``, ``opd.teachers.<name>.*``."""
    if dataclasses.is_dataclass(kind):
        return f"{prefix}.{name}.*"
    if typing.get_origin(kind) is dict:
        return f"{prefix}.{name}.<name>.*"
    return f"{prefix}.{name}"


def _build_named(cls: type[_Node], values: Any, prefix: str) -> dict[str, _Node]:
    """A mapping of names to ``cls`` nodes (``opd.teachers``); null means none."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise OPDConfigError(f"{prefix}={values!r} must be a mapping of names to {prefix}.<name>.* settings.")
    return {str(name): _build(cls, {} if node is None else node, f"{prefix}.{name}") for name, node in values.items()}


def _check_types(node: Any, prefix: str) -> None:
    """Refuse a field whose value is not of its annotated type (an int passes for a float; a bool only for a bool)."""
    for name, kind in _field_types(type(node)).items():
        key, value = f"{prefix}.{name}", getattr(node, name)
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, kind):
                raise OPDConfigError(f"{key} must be a {kind.__name__}, not {value!r}.")
            _check_types(value, key)
            continue
        origin = typing.get_origin(kind)
        if origin is dict:
            if not isinstance(value, dict):
                raise OPDConfigError(f"{key} must be a mapping of names to settings, not {value!r}.")
            node_type = typing.get_args(kind)[1]
            for entry, item in value.items():
                if not isinstance(item, node_type):
                    raise OPDConfigError(f"{key}.{entry} must be a {node_type.__name__}, not {item!r}.")
                _check_types(item, f"{key}.{entry}")
            continue
        if origin is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise OPDConfigError(f"{key}={value!r} must be a list of strings, e.g. [openai/gsm8k].")
            continue
        allowed = typing.get_args(kind) or (kind,)
        if isinstance(value, bool):
            matches = bool in allowed
        else:
            matches = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
        if not matches:
            expected = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in allowed)
            raise OPDConfigError(f"{key}={value!r} ({type(value).__name__}) must be {expected}.")


def resolve_precision(config: DictConfig, opd: OPDConfig) -> str:
    """``opd.precision`` with ``auto`` resolved: ``fp32`` on CPU (spec rule 10), ``bf16`` elsewhere.

    ``fp32``: both engines compute in float32 (FSDP ``param_dtype=fp32``, which makes verl's engine
    skip autocast, verl/workers/engine/fsdp/transformer_impl.py:1559-1565); ~12x slower matmuls than
    bf16 on an H100, and FlashAttention cannot run. ``bf16``: both bodies compute in bf16 (verl's
    default), and both heads in fp32 (:mod:`verl_opd.glue.precision`), so the log-probs come from fp32 logits.
    """
    if opd.precision != "auto":
        return opd.precision
    return "fp32" if config.trainer.get("device") == "cpu" else "bf16"


def mixed_precision(precision: str) -> dict[str, str]:
    """verl's FSDP ``mixed_precision`` setting for an engine computing in ``precision`` (``fp32`` or ``bf16``)."""
    return {"param_dtype": precision, "reduce_dtype": "fp32", "buffer_dtype": "fp32"}


def _student_dropout(config: DictConfig) -> str | None:
    """A dropout probability > 0 in the student's HF config (with ``override_config``), as ``name=value``.

    verl's recompute runs the student in eval mode, its update in train mode
    (verl/workers/engine_workers.py:365 and :422): with dropout the two forwards differ.
    """
    model = config.actor_rollout_ref.model
    path = os.path.join(os.path.expanduser(str(model.path)), "config.json")
    if not os.path.isfile(path):  # a hub id: verl reads it later; the driver cannot tell
        return None
    with open(path) as handle:
        settings = {**json.load(handle), **(model.get("override_config") or {})}
    for name, value in sorted(settings.items()):
        is_dropout = "dropout" in name or name.endswith("pdrop")
        if is_dropout and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return f"the student's {name}={value} (dropout: its update forward differs from the recompute's)"
    return None


def _recompute_blocker(config: DictConfig) -> str | None:
    """The first setting under which the update's forward is not verl's old_log_prob recompute; None if none.

    The recompute (verl/trainer/ppo/v1/trainer_base.py:584-586, ``_compute_old_log_prob``) runs the student on
    the weights the update starts from. The update's forward sees the same weights, tokens and temperature
    exactly when it makes a single optimizer step per batch (one epoch, one mini-batch), takes no
    importance weights or rejections computed from ``old_log_probs``, uses the policy loss whose gradient at
    ratio 1 is ``-A * grad log pi`` (verl's ``vanilla`` PPO clip), and the model has no dropout.
    """
    actor = config.actor_rollout_ref.actor
    if actor.get("ppo_epochs", 1) != 1:
        return f"actor_rollout_ref.actor.ppo_epochs={actor.ppo_epochs} (several passes over the batch)"
    # verl's sync trainer updates parameter_sync_step times per step, each on train_batch_size / that many prompts
    sync_steps = OmegaConf.select(config, "trainer.v1.sync.parameter_sync_step", default=1) or 1
    per_update = config.data.train_batch_size // sync_steps
    if actor.ppo_mini_batch_size < per_update:
        return (
            f"actor_rollout_ref.actor.ppo_mini_batch_size={actor.ppo_mini_batch_size} (< {per_update} prompts per "
            "update: several optimizer steps, so later mini-batches see updated weights)"
        )
    loss_mode = OmegaConf.select(config, LOSS_MODE_KEY, default="vanilla")
    if loss_mode != "vanilla":
        return f"{LOSS_MODE_KEY}={loss_mode} (only vanilla's gradient at ratio 1 is the plain policy gradient)"
    for name in ("rollout_is", "rollout_rs"):
        value = OmegaConf.select(config, f"algorithm.rollout_correction.{name}")
        if value is not None:
            return f"algorithm.rollout_correction.{name}={value} (computed from old_log_probs)"
    return _student_dropout(config)


def resolve_recompute(config: DictConfig, opd: OPDConfig) -> tuple[str, str]:
    """``opd.recompute`` resolved to ``always`` or ``never``, and the reason, for the start-up log.

    ``auto``: ``never`` where skipping the recompute is exact (:func:`_recompute_blocker` finds nothing),
    else ``always``. ``never`` where it is not exact is refused, naming the setting that prevents it.
    """
    if opd.recompute == "always":
        return "always", "kept because opd.recompute=always"
    blocker = _recompute_blocker(config)
    if blocker is None and opd.teacher.view == VIEW_OWN:
        # The on-policy loss corrects per-token KL rewards; the own view credits whole chunks (core/xtok.py).
        blocker = f"opd.teacher.view={VIEW_OWN} (its rewards are per chunk; the on-policy loss corrects per token)"
    if blocker is None and len(set(opd.teacher_kl_coefs())) > 1:
        # The on-policy loss is registered with one kl_coef (glue/policy_loss.py); the teachers' differ.
        blocker = "opd.teachers.<name>.kl_coef differ (the on-policy loss takes one kl_coef)"
    if blocker is None:
        return "never", (
            "skipped: exact because each step is one on-policy update (ppo_epochs=1, one mini-batch, vanilla "
            "policy loss, no rollout correction, no dropout); the student log-prob of the advantage comes from "
            f"the update's own forward ({LOSS_MODE_KEY}={ONPOLICY_LOSS})"
        )
    if opd.recompute == "never":
        raise OPDConfigError(
            f"opd.recompute=never skips verl's old_log_prob recompute, which is exact only for one on-policy "
            f"update per step; here {blocker}. Change that setting, or set opd.recompute=auto (keeps the "
            "recompute where it is needed)."
        )
    return "always", f"kept because {blocker}"


def resolve_shaping(config: DictConfig, opd: OPDConfig) -> tuple[str, str]:
    """``opd.teacher.shaping`` resolved to ``none``, ``teacher`` or ``both``, and the reason, for the start-up log.

    ``auto`` is ``both`` where the teacher tokenises the response differently from the student (chunks span
    several tokens, and a canonical token's lookahead biases each chunk's log-ratio:
    :mod:`verl_opd.core.xtok_shaping`), and ``none`` where it tokenises identically (every chunk is one
    token, the per-token log-ratio has no lookahead, and the run equals ``view=student`` exactly).
    Shaping reads every position's logits through verl's per-token logits hook (:mod:`verl_opd.glue.shaping`),
    which is refused where that hook does not see whole sequences' logits.
    """
    teacher = opd.teacher
    if opd.teachers or teacher.view != VIEW_OWN:
        return SHAPING_NONE, "none: the teacher scores the student's own tokens"
    if teacher.shaping == SHAPING_AUTO:
        from verl_opd.checks.tokenizer_check import same_tokenization

        if same_tokenization(config.actor_rollout_ref.model.path, teacher.model_path):
            return SHAPING_NONE, "none (auto): the teacher tokenises like the student, every chunk is one token"
        shaping, reason = SHAPING_BOTH, "both (auto): the teacher tokenises differently from the student"
    else:
        shaping, reason = teacher.shaping, f"{teacher.shaping}: opd.teacher.shaping={teacher.shaping}"
    if shaping == SHAPING_NONE:
        return shaping, reason
    for key in SP_KEYS:
        size = OmegaConf.select(config, key, default=1) or 1
        if size > 1:
            raise OPDConfigError(
                f"opd.teacher.shaping={shaping} reads whole sequences' logits in verl's per-token logits hook, but "
                f"{key}={size} gives each rank one shard of them. Set {key}=1, or opd.teacher.shaping=none."
            )
    if OmegaConf.select(config, "actor_rollout_ref.model.use_fused_kernels", default=False):
        raise OPDConfigError(
            f"opd.teacher.shaping={shaping} needs the logits, which verl's fused LM head never materialises "
            "(actor_rollout_ref.model.use_fused_kernels=True). Set it to False, or opd.teacher.shaping=none."
        )
    return shaping, reason


def _refuse_precision_conflicts(config: DictConfig, precision: str) -> None:
    """Refuse, before anything loads, a precision that the attention or LM-head kernels cannot honour."""
    model = config.actor_rollout_ref.model
    attn = OmegaConf.select(config, ATTN_KEY)
    if precision == "fp32" and (attn or VERL_DEFAULT_ATTN).startswith("flash"):
        shown = f"{ATTN_KEY}={attn}" if attn else f"{ATTN_KEY} unset (verl's default: {VERL_DEFAULT_ATTN})"
        raise OPDConfigError(
            f"opd.precision=fp32 computes both models in float32, but attention is FlashAttention ({shown}), "
            f"which takes fp16/bf16 only: the first log-prob pass would crash. Set {ATTN_KEY}=sdpa (command line: "
            f"++{ATTN_KEY}=sdpa), or opd.precision=bf16 (bf16 compute with fp32 log-probs, the GPU default)."
        )
    backend = (model.get("fused_kernel_options") or {}).get("impl_backend")
    if precision == "bf16" and model.get("use_fused_kernels", False) and backend != "triton":
        raise OPDConfigError(
            "opd.precision=bf16 needs fp32 logits, but actor_rollout_ref.model.use_fused_kernels=True with "
            f"fused_kernel_options.impl_backend={backend} computes hidden @ weight.T in bf16 "
            "(verl/utils/experimental/torch_functional.py): bf16 log-probs. Set "
            "actor_rollout_ref.model.fused_kernel_options.impl_backend=triton (fp32 tiles) or "
            "actor_rollout_ref.model.use_fused_kernels=False (verl-opd's fp32 LM head)."
        )


def _take_legacy_teacher_key(config: DictConfig) -> None:
    """Accept ``+actor_rollout_ref.ref.model.path=T`` (the original design's key) as the teacher.

    verl 0.9.1 has no such key and would crash building the ref dataclass, so it is
    moved to ``opd.teacher.model_path`` here, or refused when both disagree.
    """
    legacy = OmegaConf.select(config, LEGACY_TEACHER_KEY)
    if legacy is None:
        return
    current = OmegaConf.select(config, "opd.teacher.model_path")
    if current not in (None, legacy):
        raise OPDConfigError(
            f"Two different teachers given: {LEGACY_TEACHER_KEY}={legacy!r} and opd.teacher.model_path={current!r}. "
            "Keep only opd.teacher.model_path."
        )
    with open_dict(config):
        OmegaConf.update(config, "opd.teacher.model_path", legacy, force_add=True)
        del config.actor_rollout_ref.ref.model
    logger.warning("verl-opd: %s is deprecated; using it as opd.teacher.model_path=%s", LEGACY_TEACHER_KEY, legacy)


def _refuse_conflicts(config: DictConfig, opd: OPDConfig) -> None:
    arr = config.actor_rollout_ref
    if not config.trainer.get("use_v1", True):
        raise OPDConfigError(
            "trainer.use_v1=False runs verl's legacy trainer, whose reference model is a copy of the student: "
            "the teacher would never be loaded. Set trainer.use_v1=True (the default)."
        )
    if arr.actor.get("use_kl_loss", False):
        raise OPDConfigError(
            "actor_rollout_ref.actor.use_kl_loss=True adds a KL-to-reference loss; with OPD the teacher takes the "
            "reference slot, so that loss would pull the student towards the teacher twice. "
            "Set actor_rollout_ref.actor.use_kl_loss=False."
        )
    if OmegaConf.select(config, "algorithm.rollout_correction.bypass_mode"):
        raise OPDConfigError(
            "algorithm.rollout_correction.bypass_mode=True makes verl skip the student's log-prob recompute and "
            "use the rollout engine's log-probs as old_log_probs: OPD's advantage would then rest on the sampler's "
            "numerics, and their gap to the trainer's (opd/rollout_vs_train_log_prob_abs_diff_*) would read 0 "
            "without being measured. Set algorithm.rollout_correction.bypass_mode=False (verl's decoupled mode, "
            "where rollout_is / rollout_rs are applied by OPD's advantage step as by verl's)."
        )
    if OmegaConf.select(config, "distillation.enabled"):
        raise OPDConfigError(
            "distillation.enabled=True turns on verl's built-in distillation, a second teacher path. "
            "Use one: set distillation.enabled=False for verl-opd's algorithm.adv_estimator=opd."
        )
    for _, key, teacher in opd.teacher_list():
        if teacher.offload and config.trainer.device == "cpu":
            raise OPDConfigError(
                f"{key}.offload=True streams the teacher from pinned host memory to a GPU; there is no GPU with "
                f"trainer.device=cpu. Set {key}.offload=False."
            )


def _warn_biased_sampling(config: DictConfig) -> None:
    rollout = config.actor_rollout_ref.rollout
    temperature, top_p, top_k = rollout.get("temperature", 1.0), rollout.get("top_p", 1.0), rollout.get("top_k", -1)
    if temperature != 1.0:
        logger.warning(
            "verl-opd: rollout.temperature=%s. The student samples from softmax(logits/T) and both log-probs are "
            "scored at T, so the reverse KL is that of the tempered policies, not of the models themselves. "
            "Use temperature=1.0 for the unbiased estimator.",
            temperature,
        )
    if top_p not in (None, 1.0) or top_k not in (None, -1, 0):
        logger.warning(
            "verl-opd: rollout top_p=%s top_k=%s truncate the sampling distribution, but the log-probs are of the "
            "untruncated one: the reverse-KL estimate is biased. Use top_p=1.0 and top_k=-1.",
            top_p,
            top_k,
        )


def _opd_rules(config: DictConfig, opd: OPDConfig, precision: str, recompute: str) -> list[tuple[str, Any]]:
    arr = config.actor_rollout_ref
    rules: list[tuple[str, Any]] = [
        # verl builds a reference worker only when something reads a reference KL
        # (verl/trainer/ppo/utils.py need_reference_policy); OPD's worker loads the teacher in that
        # slot. Nothing else of verl's in-reward KL runs: OPDTrainer._compute_advantage replaces the
        # step that reads algorithm.kl_penalty / kl_ctrl, so those keys are left as they are.
        ("algorithm.use_kl_in_reward", True),
        ("trainer.v1.trainer_mode", TRAINER_MODE),
        # The rollout's own log-probs are kept to log their gap to the trainer's; with the recompute skipped
        # they stand in for old_log_probs, from which the onpolicy loss corrects the advantage (glue/policy_loss.py).
        ("actor_rollout_ref.rollout.calculate_log_probs", True),
        # Both bodies compute in opd.precision; both heads in fp32 (verl_opd.glue.precision). verl's ref engine
        # config is ref.fsdp_config (verl/workers/config/actor.py:321), so this reaches the teacher's engine.
        ("actor_rollout_ref.actor.fsdp_config.mixed_precision", mixed_precision(precision)),
        ("actor_rollout_ref.ref.fsdp_config.mixed_precision", mixed_precision(precision)),
        # verl stores weights in model_dtype and only computes in the mixed-precision dtype:
        # a bf16 teacher saves memory only if it is also stored in bf16. With several teachers, each
        # teacher's engine takes its own dtype (glue.teacher_worker.TeacherSet); this is the first's.
        ("actor_rollout_ref.ref.fsdp_config.model_dtype", PRECISION_NAMES[opd.teacher_list()[0][2].dtype]),
    ]
    if not arr.ref.get("log_prob_use_dynamic_bsz", False) and arr.ref.get("log_prob_micro_batch_size_per_gpu") is None:
        micro = arr.rollout.get("log_prob_micro_batch_size_per_gpu") or arr.actor.get("ppo_micro_batch_size_per_gpu")
        rules.append(("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", micro))
    if recompute == "never":
        rules.append((LOSS_MODE_KEY, ONPOLICY_LOSS))
    return rules


def _absolute_teacher_paths(opd: OPDConfig) -> dict[str, Any]:
    """``opd.teacher`` or ``opd.teachers`` with absolute model paths (for ``dataclasses.replace(opd, ...)``)."""
    if opd.teachers:
        absolute = {
            name: dataclasses.replace(t, model_path=os.path.abspath(t.model_path)) for name, t in opd.teachers.items()
        }
        return {"teachers": absolute}
    return {"teacher": dataclasses.replace(opd.teacher, model_path=os.path.abspath(opd.teacher.model_path))}


def apply_opd_settings(config: DictConfig) -> list[str]:
    """Validate an OPD run and set what it needs in ``config``; return the ``key=value`` changes."""
    from verl_opd.checks.checkpoint_identity import check_resume_teacher
    from verl_opd.checks.inputs import check_model_weights
    from verl_opd.checks.teacher_fit import check_teacher_fits
    from verl_opd.checks.tokenizer_check import assert_compatible_tokenizers, assert_own_view_supported

    _take_legacy_teacher_key(config)
    opd = OPDConfig.from_config(config)
    opd.validate()
    teachers = opd.teacher_list()
    for _, key, teacher in teachers:
        # Before the tokenizer check: a directory with only config.json would be blamed on its tokenizer.
        check_model_weights(teacher.model_path, f"{key}.model_path")
    _refuse_conflicts(config, opd)
    precision = resolve_precision(config, opd)
    _refuse_precision_conflicts(config, precision)
    for _, _, teacher in teachers:
        check_teacher_fits(config, teacher.model_path)
    _warn_biased_sampling(config)
    student = config.actor_rollout_ref.model.path
    for _, _, teacher in teachers:
        if teacher.view == VIEW_OWN:  # its requirements are not optional: opd.check_tokenizers is for view=student
            assert_own_view_supported(student, teacher.model_path)
        elif opd.check_tokenizers:
            assert_compatible_tokenizers(student, teacher.model_path)
    check_resume_teacher(config, opd)
    recompute, recompute_reason = resolve_recompute(config, opd)
    shaping, shaping_reason = resolve_shaping(config, opd)

    changes = []
    with open_dict(config):
        for key, value in _opd_rules(config, opd, precision, recompute):
            current = OmegaConf.select(config, key)
            if isinstance(current, DictConfig):
                current = OmegaConf.to_container(current)
            if current != value:
                OmegaConf.update(config, key, value, force_add=True)
                changes.append(f"{key}={value}")
        # Workers only receive actor_rollout_ref: give them the opd node there, with an absolute
        # teacher path (Ray workers need not share the driver's working directory) and the precision resolved.
        teachers_resolved = _absolute_teacher_paths(opd)
        if "teacher" in teachers_resolved:
            teachers_resolved["teacher"] = dataclasses.replace(teachers_resolved["teacher"], shaping=shaping)
        resolved = dataclasses.replace(opd, precision=precision, recompute=recompute, **teachers_resolved)
        config.actor_rollout_ref.opd = OmegaConf.structured(resolved)
        if any(teacher.view == VIEW_OWN for _, _, teacher in teachers):
            kwargs = OmegaConf.select(config, "data.apply_chat_template_kwargs", default=None)
            config.actor_rollout_ref[CHAT_TEMPLATE_KWARGS_KEY] = kwargs if kwargs is not None else {}
    logger.warning("verl-opd: algorithm.adv_estimator=opd applied: %s", ", ".join(changes) or "nothing to change")
    logger.warning("verl-opd: old_log_prob recompute %s", recompute_reason)
    if opd.teacher.view == VIEW_OWN:
        logger.warning("verl-opd: boundary-lookahead shaping %s", shaping_reason)
    return changes
