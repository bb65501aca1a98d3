"""``config``: the overrides compose into a run that verl-opd's driver hook and verl accept.

Exactly what ``python -m verl.trainer.main_ppo`` does at start-up, in this process:
compose, :func:`verl_opd.glue.driver.configure` (with the same overrides, so the same CPU
defaults), verl's ``validate_config``. Then the files and machine the run would use,
with the driver's own functions (:mod:`verl_opd.checks.inputs`, :mod:`verl_opd.checks.resources`).
Keys of the run the overrides do not give (rollout engine, data files, devices; with
no overrides at all, also verl's ``validate_config``) are reported as ``SKIP`` with what
to pass: they belong to the run, not to the pair.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from verl_opd.checks.inputs import DATA_KEYS, STUDENT_KEY, TEACHER_KEY
from verl_opd.tools.doctor.report import FAIL, PASS, SKIP, WARN, Check

CONFIG_MODULE = "verl.trainer.config"
DEFAULT_CONFIG_NAME = "opd_trainer"
ROLLOUT_KEY = "actor_rollout_ref.rollout.name"
# What verl validates in place of an unset rollout engine: its checks do not depend on which engine.
PLACEHOLDER_ROLLOUT = "vllm"
# Keys (or key prefixes) that describe the machine a run asks for.
DEVICE_KEYS = ("trainer.device", "trainer.n_gpus_per_node", "trainer.nnodes", "ray_kwargs.")
HOW_TO_GIVE = {
    ROLLOUT_KEY: f"pass {ROLLOUT_KEY}=vllm (or sglang) for a GPU run, or trainer.device=cpu",
    "data.train_files": "pass data.train_files=<parquet> (a smoke test: `verl-opd tiny data --out DIR`)",
    "data.val_files": "pass data.val_files=<parquet>",
    "resources": "pass trainer.n_gpus_per_node=N (and trainer.nnodes=M), or trainer.device=cpu",
}


def _hydra_value(value: str) -> str:
    """``value`` as a Hydra override value (quoted unless plainly safe)."""
    if re.fullmatch(r"[\w./~\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_opd_config(
    overrides: Sequence[str],
    config_name: str = DEFAULT_CONFIG_NAME,
    student: str | None = None,
    teacher: str | None = None,
) -> Any:
    """Compose verl's config like ``main_ppo`` does (``verl.trainer.config`` + ``config_name``).

    ``teacher``/``student`` are added as ``++opd.teacher.model_path`` /
    ``actor_rollout_ref.model.path`` (``++`` works with and without an ``opd`` node).
    Nothing is validated here: see :func:`check_config`.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    extra = []
    if teacher is not None:
        extra.append(f"++{TEACHER_KEY}={_hydra_value(teacher)}")
    if student is not None:
        extra.append(f"{STUDENT_KEY}={_hydra_value(student)}")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return compose(config_name=config_name, overrides=[*extra, *overrides])


class _Records(logging.Handler):
    """Collects verl-opd's log records (instead of printing them) while the driver hook runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _capture_verl_opd_logs() -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    log = logging.getLogger("verl_opd")
    propagate = log.propagate
    log.addHandler(handler)
    log.propagate = False  # verl installs a root handler; the doctor prints these itself
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _missing_keys(config: Any) -> list[str]:
    """Mandatory (``???``) values left unset, in the sections the run will use."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(config))
    if not OmegaConf.select(config, "reward.reward_model.enable", default=False):
        missing = [key for key in missing if not key.startswith("reward.reward_model.")]
    return missing


def _log_checks(records: list[logging.LogRecord]) -> tuple[list[str], list[Check]]:
    applied, warned = [], []
    for record in records:
        message = record.getMessage()
        if " applied: " in message:
            applied.append(message.removeprefix("verl-opd: "))
        elif record.levelno >= logging.WARNING:
            warned.append(Check("config", "warning", WARN, message.removeprefix("verl-opd: ")))
    return applied, warned


def _not_given(name: str, what: str) -> Check:
    return Check("config", name, SKIP, f"not checked: {what} not given; {HOW_TO_GIVE[name]}")


def check_data(config: Any, given: set[str]) -> list[Check]:
    """Each data key given, with the driver's own checks (:mod:`verl_opd.checks.inputs`).

    With ``opd.teachers``, one more line: whether every sample of the readable files has a teacher.
    """
    from omegaconf import OmegaConf

    from verl_opd.checks.inputs import check_data_files, check_teacher_routing
    from verl_opd.config.opd_config import OPDConfigError

    checks = []
    readable = True
    for key in DATA_KEYS:
        if key not in given:
            checks.append(_not_given(key, "the run's data"))
            continue
        try:
            files = check_data_files(config, key)
        except OPDConfigError as exc:
            checks.append(Check("config", key, FAIL, str(exc)))
            readable = False
            continue
        checks.append(Check("config", key, PASS, ", ".join(files) or "remote files: left to verl"))
    if readable and OmegaConf.select(config, "opd.teachers"):
        try:
            check_teacher_routing(config)
        except OPDConfigError as exc:
            checks.append(Check("config", "teacher routing", FAIL, str(exc)))
        else:
            checks.append(Check("config", "teacher routing", PASS, "every sample of the data files has a teacher"))
    return checks


def check_machine(config: Any, given: set[str]) -> list[Check]:
    """The run's resource request vs this machine (:func:`verl_opd.checks.resources.check_resources`), and its engine.

    A GPU run on a machine without any GPU is a ``WARN``: the doctor needs no GPU, and
    is often run before moving to the GPU machine (``main_ppo`` there is checked again).
    """
    from omegaconf import OmegaConf

    from verl_opd.checks.resources import ResourceError, check_resources, ray_address, resource_pools, visible_devices

    checks = []
    rollout = OmegaConf.select(config, ROLLOUT_KEY, default=None)
    if rollout in ("vllm", "sglang") and importlib.util.find_spec(rollout) is None:
        checks.append(
            Check(
                "config",
                "rollout engine",
                WARN,
                f"{ROLLOUT_KEY}={rollout} but {rollout} is not installed here (pip install 'verl[{rollout}]==0.9.1' "
                "on the GPU machine; trainer.device=cpu uses the 'hf' rollout)",
            )
        )
    if not any(key.startswith(DEVICE_KEYS) for key in given):
        return [*checks, _not_given("resources", "the run's devices")]
    try:
        check_resources(config)
    except ResourceError as exc:
        gpu_run_elsewhere = config.trainer.device != "cpu" and not ray_address(config) and visible_devices()[0] == 0
        if gpu_run_elsewhere:
            detail = f"this machine has no GPU, so main_ppo would refuse the run here: {exc}\nfine if it runs elsewhere"
            return [*checks, Check("config", "resources", WARN, detail)]
        return [*checks, Check("config", "resources", FAIL, str(exc))]
    return [*checks, Check("config", "resources", PASS, f"Ray can place {resource_pools(config)} here")]


def check_config(
    overrides: Sequence[str],
    config_name: str = DEFAULT_CONFIG_NAME,
    student: str | None = None,
    teacher: str | None = None,
) -> list[Check]:
    """Compose, then run verl-opd's driver hook and verl's ``validate_config`` as ``main_ppo`` does.

    With ``trainer.device=cpu`` the hook also switches this process to verl-opd's CPU
    platform (environment variables included), as it would in the driver of a run.
    """
    from omegaconf import OmegaConf, open_dict

    from verl_opd.checks.overrides import given_keys

    try:
        config = compose_opd_config(overrides, config_name, student=student, teacher=teacher)
    except Exception as exc:  # noqa: BLE001 - Hydra's errors name the bad override
        return [
            Check(
                "config",
                "compose",
                FAIL,
                f"the overrides do not compose with config {config_name!r}: {type(exc).__name__}: {exc}\n"
                "hint: a key that is not in the config needs a leading '+' (e.g. +opd.teacher.model_path=... "
                "with the stock ppo_trainer config); options such as --config-name go before the overrides",
            )
        ]
    checks = [Check("config", "compose", PASS, f"config {config_name!r} + {len(overrides)} override(s)")]
    given = given_keys(overrides)

    estimator = OmegaConf.select(config, "algorithm.adv_estimator")
    if estimator != "opd":
        checks.append(
            Check(
                "config",
                "algorithm.adv_estimator",
                FAIL,
                f"is {estimator!r}, so verl-opd does nothing: add algorithm.adv_estimator=opd "
                "(or use --config-name opd_trainer)",
            )
        )
        return checks
    if not OmegaConf.select(config, "trainer.use_v1", default=True):
        checks.append(
            Check(
                "config",
                "trainer.use_v1",
                FAIL,
                "trainer.use_v1=False runs verl's legacy trainer, which never loads the teacher (its reference "
                "model is a copy of the student): set trainer.use_v1=True",
            )
        )

    from verl_opd.glue.driver import configure

    quiet = contextlib.redirect_stdout(io.StringIO())  # verl prints its checkpoint lookup
    with _capture_verl_opd_logs() as records, quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            configure(config, overrides, check_environment=False)  # files and machine: reported one by one below
        except Exception as exc:  # noqa: BLE001 - OPDConfigError, TokenizerMismatchError, resume refusals, I/O
            checks.append(Check("config", f"verl-opd settings ({type(exc).__name__})", FAIL, str(exc)))
            return checks
    applied, warned = _log_checks(records)
    checks.append(Check("config", "verl-opd settings", PASS, "\n".join(applied) or "accepted"))
    checks += warned

    if not overrides:  # the pair alone (README form): the run's own keys are all verl's defaults
        return [
            *checks,
            Check(
                "config",
                "run",
                SKIP,
                "not checked: no overrides given, so verl's validate_config, the rollout engine, data files and "
                "resources were not checked; add your main_ppo overrides after the options to check them",
            ),
        ]
    missing = _missing_keys(config)
    validated = config
    if ROLLOUT_KEY in missing and ROLLOUT_KEY not in given:
        checks.append(_not_given(ROLLOUT_KEY, "the rollout engine"))
        missing.remove(ROLLOUT_KEY)
        validated = copy.deepcopy(config)
        with open_dict(validated):
            OmegaConf.update(validated, ROLLOUT_KEY, PLACEHOLDER_ROLLOUT)
    if missing:
        checks.append(Check("config", "mandatory values", FAIL, f"unset (???): {missing}"))
        return checks

    try:
        OmegaConf.resolve(OmegaConf.create(OmegaConf.to_container(validated, resolve=False)))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("config", "interpolations", FAIL, f"{type(exc).__name__}: {exc}"))
        return checks

    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
            warnings.simplefilter("ignore")
            validate_config(
                config=validated,
                use_reference_policy=need_reference_policy(validated),
                use_critic=need_critic(validated),
            )
    except Exception as exc:  # noqa: BLE001 - verl raises AssertionError, ValueError, TypeError...
        checks.append(Check("config", "verl validate_config", FAIL, f"{type(exc).__name__}: {exc}"))
        return checks
    detail = "all of verl's checks passed"
    if validated is not config:
        detail += f" (with {ROLLOUT_KEY}={PLACEHOLDER_ROLLOUT} in place of the unset key)"
    checks.append(Check("config", "verl validate_config", PASS, detail))
    return checks + check_data(config, given) + check_machine(config, given)
