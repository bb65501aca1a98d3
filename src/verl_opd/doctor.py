"""``verl-opd doctor``: pre-flight checks for an OPD run, before any GPU time is spent.

Each check prints one line, ``PASS``, ``WARN`` or ``FAIL``, with its reason; the exit
code is 1 when any check failed. The checks, in order:

* ``versions``: Python, verl, torch and transformers against the supported ranges.
* ``plugin``: the ``verl.plugins`` entry point is installed, and in a FRESH Python
  process ``import verl`` loads the plugin without error and registers the ``opd``
  advantage estimator and the ``opd`` trainer (verl swallows plugin errors, so this
  is the only way to see them before a run).
* ``tokenizers``: student and teacher map text to the same ids, share special tokens
  and the chat template (:func:`verl_opd.tokenizer_check.compare_tokenizers`).
* ``config``: the Hydra overrides compose into a verl config that verl-opd's driver
  hook (:func:`verl_opd.driver.configure`) and verl's own ``validate_config`` accept,
  exactly as ``python -m verl.trainer.main_ppo`` would do at start-up.
* ``selftest`` (``--selftest``): CPU numerics on tiny models built in a temp dir:
  teacher == student gives advantages of exactly 0, a distinct teacher a reverse KL > 0.

Usage::

    python verify_opd_implementation.py --student S --teacher T [--selftest] [hydra overrides...]
    verl-opd doctor --student S --teacher T [--config-name ppo_trainer] [hydra overrides...]

Options come first, then the Hydra overrides (as with ``main_ppo``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Check",
    "SUPPORTED_VERSIONS",
    "add_doctor_arguments",
    "add_doctor_parser",
    "check_config",
    "check_plugin",
    "check_tokenizers",
    "check_versions",
    "compose_opd_config",
    "main",
    "permute_token_ids",
    "run_doctor",
    "run_selftest",
]

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
SECTIONS = ("versions", "plugin", "tokenizers", "config", "selftest")

# What verl-opd is built and tested against (pyproject.toml pins the same ranges).
SUPPORTED_VERSIONS: tuple[tuple[str, str], ...] = (
    ("python", ">=3.10,<3.13"),
    ("verl", "==0.9.1"),
    ("torch", ">=2.6"),
    ("transformers", ">=5.5.3,<5.11"),
)

CONFIG_MODULE = "verl.trainer.config"
DEFAULT_CONFIG_NAME = "opd_trainer"
TEACHER_KEY = "opd.teacher.model_path"
STUDENT_KEY = "actor_rollout_ref.model.path"
PLUGIN_TIMEOUT_S = 600

# Fix to print under a failed tokenizer check (the check's own detail says what differs).
_TOKENIZER_FIXES = {
    "vocabulary ids": "the teacher would score other tokens than the student sampled; use a teacher of the "
    "student's model family whose tokenizer files are identical",
    "teacher embedding covers student ids": "the teacher needs an embedding row for every id the student can emit; "
    "use a teacher whose vocab_size is at least the student's",
    "probe texts encode to the same ids": "the two tokenizers split text differently; use one tokenizer for both",
    "special tokens": "make bos/eos/pad/unk identical, e.g. save the student with the teacher's tokenizer files "
    "(tokenizer.json, tokenizer_config.json, chat_template.jinja)",
    "chat template": "the teacher would score prompts rendered in the student's format, not its own; give both the "
    "same chat template (chat_template.jinja / tokenizer_config.json) or set opd.check_tokenizers=False on purpose",
}


@dataclass(frozen=True)
class Check:
    """One result line: section, what was checked, ``PASS``/``WARN``/``FAIL``/``SKIP``, and why."""

    section: str
    name: str
    status: str
    detail: str

    def line(self) -> str:
        head = f"{self.status:<4}  [{self.section}] {self.name}"
        if not self.detail:
            return head
        first, *rest = self.detail.strip().splitlines() or [""]
        text = f"{head}: {first}"
        if rest:
            text += "\n" + textwrap.indent("\n".join(rest), " " * 6)
        return text


# --------------------------------------------------------------------------------------------- versions


def _installed_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def check_versions() -> list[Check]:
    """Python, verl, torch and transformers against :data:`SUPPORTED_VERSIONS`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    checks = []
    for name, spec in SUPPORTED_VERSIONS:
        if name == "python":
            installed: str | None = ".".join(str(part) for part in sys.version_info[:3])
        else:
            installed = _installed_version(name)
        if installed is None:
            checks.append(Check("versions", name, FAIL, f"not installed; supported {spec}: pip install '{name}{spec}'"))
            continue
        try:
            ok = Version(installed) in SpecifierSet(spec, prereleases=True)
        except InvalidVersion:
            ok = False
        detail = f"{installed} (supported {spec})"
        if not ok:
            fix = "use Python 3.10-3.12" if name == "python" else f"pip install '{name}{spec}'"
            detail += f": unsupported, {fix}"
        checks.append(Check("versions", name, PASS if ok else FAIL, detail))
    return checks


# ----------------------------------------------------------------------------------------------- plugin

# Runs in a fresh interpreter: exactly what every verl process does at its first ``import verl``.
_PLUGIN_PROBE = r"""
import json, sys, traceback
out = {}
def step(name, fn):
    try:
        out[name] = {"ok": True, "detail": fn()}
    except BaseException as exc:
        out[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}".strip()}
import verl
out["verl"] = {"ok": True, "detail": getattr(verl, "__version__", "?")}
out["loaded_by_verl"] = {"ok": "verl_opd.plugin" in sys.modules, "detail": ""}
def estimator():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    fn = get_adv_estimator_fn("opd")
    return f"{fn.__module__}.{fn.__qualname__}"
step("estimator", estimator)
def plugin():
    import verl_opd.plugin as p
    assert p.LOAD_ERROR is None, p.LOAD_ERROR.strip().splitlines()[-1]
    return "verl_opd.plugin.LOAD_ERROR is None"
step("plugin", plugin)
def trainer():
    from verl.trainer.ppo.v1 import get_trainer_cls
    cls = get_trainer_cls("opd")
    return f"{cls.__module__}.{cls.__qualname__}"
step("trainer", trainer)
print("VERL_OPD_PROBE " + json.dumps(out), flush=True)
"""


def _entry_point_checks() -> list[Check]:
    from importlib.metadata import entry_points

    ours = [ep for ep in entry_points(group="verl.plugins") if ep.value.split(":")[0] == "verl_opd.plugin"]
    if not ours:
        return [
            Check(
                "plugin",
                "entry point",
                FAIL,
                "no verl.plugins entry point for verl_opd.plugin in this environment: install the package "
                "(pip install -e . in the verl-opd checkout) into the Python that runs verl",
            )
        ]
    checks = [Check("plugin", "entry point", PASS, f"verl.plugins: {ours[0].name} = {ours[0].value}")]
    policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    allowed = policy == "auto" or (policy != "none" and ours[0].name in {p.strip() for p in policy.split(",")})
    if not allowed:
        checks.append(
            Check(
                "plugin",
                "VERL_USE_EXTERNAL_PLUGINS",
                FAIL,
                f"VERL_USE_EXTERNAL_PLUGINS={policy!r} stops verl from loading verl-opd: unset it, or add "
                f"{ours[0].name!r} to its comma-separated list",
            )
        )
    return checks


def check_plugin(python: str = sys.executable, timeout_s: float = PLUGIN_TIMEOUT_S) -> list[Check]:
    """The entry point is installed, and a fresh ``import verl`` registers ``opd`` (estimator and trainer)."""
    checks = _entry_point_checks()
    if any(c.status == FAIL and c.name == "entry point" for c in checks):
        return checks
    try:
        proc = subprocess.run(
            [python, "-c", _PLUGIN_PROBE], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return [*checks, Check("plugin", "fresh process", FAIL, f"`import verl` did not finish in {timeout_s:.0f} s")]
    found = re.search(r"^VERL_OPD_PROBE (.*)$", proc.stdout, re.MULTILINE)
    if not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return [
            *checks,
            Check("plugin", "fresh process", FAIL, f"`import verl` failed (exit {proc.returncode}):\n{tail}"),
        ]
    probe: dict[str, dict[str, Any]] = json.loads(found.group(1))
    stderr_tail = "\n".join(proc.stderr.strip().splitlines()[-8:])

    plugin = probe["plugin"]
    if plugin["ok"] and probe["loaded_by_verl"]["ok"]:
        checks.append(Check("plugin", "loads in a fresh process", PASS, f"import verl {probe['verl']['detail']}"))
    elif plugin["ok"]:
        checks.append(
            Check(
                "plugin",
                "loads in a fresh process",
                FAIL,
                "`import verl` did not load verl_opd.plugin (entry points disabled? stale install?): "
                "reinstall with pip install -e . and unset VERL_USE_EXTERNAL_PLUGINS",
            )
        )
    else:
        detail = f"verl_opd.plugin failed to load: {plugin['detail']}"
        if stderr_tail:
            detail += f"\n{stderr_tail}"
        checks.append(Check("plugin", "loads in a fresh process", FAIL, detail))

    estimator = probe["estimator"]
    checks.append(
        Check(
            "plugin",
            "advantage estimator 'opd'",
            PASS if estimator["ok"] else FAIL,
            f"registered: {estimator['detail']}"
            if estimator["ok"]
            else f"verl does not know algorithm.adv_estimator=opd: {estimator['detail']}",
        )
    )
    trainer = probe["trainer"]
    checks.append(
        Check(
            "plugin",
            "trainer 'opd'",
            PASS if trainer["ok"] else FAIL,
            f"registered: {trainer['detail']}"
            if trainer["ok"]
            else f"verl does not know trainer.v1.trainer_mode=opd: {trainer['detail']}",
        )
    )
    return checks


# ------------------------------------------------------------------------------------------- tokenizers


def _model_dir_problem(path: str | None, role: str, flag: str) -> str | None:
    """Why ``path`` cannot be a model directory, or None."""
    if not path:
        return f"no {role} given: pass {flag} PATH"
    if not os.path.exists(path):
        return (
            f"{role} path {path!r} does not exist; it must be a local directory saved with save_pretrained "
            f"(download a hub model first, e.g. `hf download <org/name> --local-dir DIR`)"
        )
    if not os.path.isdir(path):
        return f"{role} path {path!r} is a file, not a model directory"
    return None


def check_tokenizers(student: str | None, teacher: str | None) -> list[Check]:
    """One line per :class:`~verl_opd.tokenizer_check.TokenizerCheck`; unreadable paths are a FAIL."""
    problems = [
        Check("tokenizers", role, FAIL, problem)
        for role, problem in (
            ("student", _model_dir_problem(student, "student", "--student")),
            ("teacher", _model_dir_problem(teacher, "teacher", "--teacher")),
        )
        if problem
    ]
    if problems:
        return problems
    from verl_opd.tokenizer_check import compare_tokenizers

    try:
        results = compare_tokenizers(student, teacher)
    except Exception as exc:  # noqa: BLE001 - any loader error is the user's to see
        return [
            Check(
                "tokenizers",
                "load",
                FAIL,
                f"could not load both tokenizers ({type(exc).__name__}: {exc}); both directories need "
                "tokenizer files saved with save_pretrained",
            )
        ]
    checks = []
    for result in results:
        detail = result.detail
        if not result.passed and result.name in _TOKENIZER_FIXES:
            detail += f"\nfix: {_TOKENIZER_FIXES[result.name]}"
        checks.append(Check("tokenizers", result.name, PASS if result.passed else FAIL, detail))
    return checks


# ----------------------------------------------------------------------------------------------- config

_OVERRIDE_KEY = re.compile(r"^(?:\+\+|\+|~)?([\w.\-/@]+)=(.*)$")


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value an override list gives ``key`` (last one wins), quotes stripped."""
    value = None
    for item in overrides:
        match = _OVERRIDE_KEY.match(item)
        if match and match.group(1) == key:
            value = match.group(2).strip().strip("'\"")
    return value


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
def _capture_verl_opd_logs():
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


def _data_files(config: Any, key: str) -> list[str]:
    from omegaconf import ListConfig, OmegaConf

    value = OmegaConf.select(config, key, default=None)
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, ListConfig)) else [str(value)]


def _environment_checks(config: Any) -> list[Check]:
    """What main_ppo would only find out after Ray and the models started."""
    import importlib.util

    from omegaconf import OmegaConf

    checks = []
    for key in ("data.train_files", "data.val_files"):
        paths = _data_files(config, key)
        local = [p for p in paths if "://" not in p]
        absent = [p for p in local if not os.path.exists(os.path.expanduser(p))]
        if absent:
            checks.append(
                Check(
                    "config",
                    key,
                    FAIL,
                    f"not found: {absent}; point {key} at parquet files in verl's RL schema (for a smoke test: "
                    "`verl-opd tiny data --out DIR`)",
                )
            )
        elif local:
            checks.append(Check("config", key, PASS, ", ".join(local)))

    device = OmegaConf.select(config, "trainer.device", default="cuda")
    rollout = OmegaConf.select(config, "actor_rollout_ref.rollout.name", default=None)
    if rollout in ("vllm", "sglang") and importlib.util.find_spec(rollout) is None:
        checks.append(
            Check(
                "config",
                "rollout engine",
                WARN,
                f"actor_rollout_ref.rollout.name={rollout} but {rollout} is not installed here "
                f"(pip install 'verl[{rollout}]==0.9.1' on the GPU machine; trainer.device=cpu uses the 'hf' rollout)",
            )
        )
    if device != "cpu":
        import torch

        wanted = int(OmegaConf.select(config, "trainer.n_gpus_per_node", default=1))
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < wanted:
            checks.append(
                Check(
                    "config",
                    "GPUs",
                    WARN,
                    f"trainer.n_gpus_per_node={wanted} but this machine shows {visible} CUDA device(s); fine if "
                    "you run elsewhere, otherwise lower trainer.n_gpus_per_node or add trainer.device=cpu",
                )
            )
        else:
            checks.append(Check("config", "GPUs", PASS, f"{visible} CUDA device(s) for n_gpus_per_node={wanted}"))
    return checks


def _log_checks(records: list[logging.LogRecord]) -> tuple[list[str], list[Check]]:
    applied, warned = [], []
    for record in records:
        message = record.getMessage()
        if " applied: " in message:
            applied.append(message.removeprefix("verl-opd: "))
        elif record.levelno >= logging.WARNING:
            warned.append(Check("config", "warning", WARN, message.removeprefix("verl-opd: ")))
    return applied, warned


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
    from omegaconf import OmegaConf

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

    from verl_opd.driver import configure

    quiet = contextlib.redirect_stdout(io.StringIO())  # verl prints its checkpoint lookup
    with _capture_verl_opd_logs() as records, quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            configure(config)
        except Exception as exc:  # noqa: BLE001 - OPDConfigError, TokenizerMismatchError, resume refusals, I/O
            checks.append(Check("config", f"verl-opd settings ({type(exc).__name__})", FAIL, str(exc)))
            return checks
    applied, warned = _log_checks(records)
    checks.append(Check("config", "verl-opd settings", PASS, "\n".join(applied) or "accepted"))
    checks += warned

    missing = _missing_keys(config)
    if missing:
        hint = ""
        if "actor_rollout_ref.rollout.name" in missing:
            hint = "\nfix: set actor_rollout_ref.rollout.name=vllm (or sglang) on GPUs, or add trainer.device=cpu"
        checks.append(Check("config", "mandatory values", FAIL, f"unset (???): {missing}{hint}"))
        return checks

    try:
        OmegaConf.resolve(OmegaConf.create(OmegaConf.to_container(config, resolve=False)))
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
                config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
            )
    except Exception as exc:  # noqa: BLE001 - verl raises AssertionError, ValueError, TypeError...
        checks.append(Check("config", "verl validate_config", FAIL, f"{type(exc).__name__}: {exc}"))
        return checks
    checks.append(Check("config", "verl validate_config", PASS, "all of verl's checks passed"))
    return checks + _environment_checks(config)


# --------------------------------------------------------------------------------------------- selftest


def permute_token_ids(model_dir: str, out_dir: str, pairs: Sequence[tuple[str, str]] = (("1", "2"), ("a", "e"))) -> str:
    """Copy ``model_dir`` to ``out_dir`` with the ids of each pair of tokens swapped in ``tokenizer.json``.

    The vocabulary keeps its size and its tokens; only which id means which token
    changes: the kind of teacher a vocab-size comparison cannot catch.
    """
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    vocab = data["model"]["vocab"]
    for a, b in pairs:
        vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w") as f:
        json.dump(data, f, ensure_ascii=False)
    return out_dir


def _sample(model: Any, prompt: list[int], max_new: int, eos_id: int, generator: Any) -> tuple[list[int], list[float]]:
    """Sample at temperature 1 (no truncation), recording each token's sampling log-prob."""
    import torch

    ids, tokens, log_probs = list(prompt), [], []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        dist = torch.log_softmax(logits, dim=-1)
        token = int(torch.multinomial(dist.exp(), 1, generator=generator))
        tokens.append(token)
        log_probs.append(float(dist[token]))
        ids.append(token)
        if token == eos_id:
            break
    return tokens, log_probs


def _teacher_forced(model: Any, prompt: list[int], response: list[int]) -> tuple[Any, Any]:
    """Log-probs of ``response`` given ``prompt`` in one forward: token t is scored at position t-1.

    Returns ``(log_probs (R,), full log-softmax rows (R, V))``, float32.
    """
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    rows = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return rows.gather(-1, torch.tensor(response)[:, None])[:, 0], rows


def run_selftest(workdir: str | None = None, n_prompts: int = 4, seed: int = 0) -> list[Check]:
    """CPU numeric check of the OPD advantage on tiny models (no Ray, no verl trainer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from verl_opd.advantage import compute_opd_advantage
    from verl_opd.tiny.model import build_model
    from verl_opd.tiny.task import make_problems, prompt_text
    from verl_opd.tiny.tokenizer import build_tokenizer
    from verl_opd.tokenizer_check import compare_tokenizers

    hf_logging.disable_progress_bar()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="verl-opd-selftest-", dir=workdir) as tmp:
        tokenizer = build_tokenizer(os.path.join(tmp, "tokenizer"), vocab_size=512, seed=seed)
        student_dir = str(build_model(os.path.join(tmp, "student"), tokenizer, seed=seed))
        teacher_dir = str(
            build_model(os.path.join(tmp, "teacher"), tokenizer, hidden_size=96, num_layers=3, seed=seed + 1)
        )
        copy_dir = shutil.copytree(student_dir, os.path.join(tmp, "student_copy"))
        checks.append(
            Check(
                "selftest",
                "tiny models",
                PASS,
                "tokenizer, student (hidden 64, 2 layers), teacher (hidden 96, 3 layers, other seed), student copy",
            )
        )

        same = compare_tokenizers(student_dir, teacher_dir)
        permuted = compare_tokenizers(student_dir, permute_token_ids(student_dir, os.path.join(tmp, "permuted")))
        ids_check = next(c for c in permuted if c.name == "vocabulary ids")
        ok = all(c.passed for c in same) and not ids_check.passed
        checks.append(
            Check(
                "selftest",
                "tokenizer check",
                PASS if ok else FAIL,
                f"accepts the shared tokenizer ({sum(c.passed for c in same)}/{len(same)}), refuses swapped ids "
                f"({ids_check.detail})",
            )
        )

        tok = AutoTokenizer.from_pretrained(student_dir)
        models = {
            name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in (("student", student_dir), ("copy", copy_dir), ("teacher", teacher_dir))
        }
        generator = torch.Generator().manual_seed(seed)
        prompts, responses, sampled = [], [], []
        for i, (question, _) in enumerate(make_problems(n_prompts, seed=seed)):
            messages = [{"role": "user", "content": prompt_text(question)}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt = tok.encode(text, add_special_tokens=False)
            response, log_probs = _sample(models["student"], prompt, 6 + 3 * i, tok.eos_token_id, generator)
            prompts.append(prompt)
            responses.append(response)
            sampled.append(log_probs)

        # Right-padded (B, T) tensors laid out like verl's response tensors; NaN on padding.
        width = max(len(r) for r in responses)
        mask = torch.zeros(len(responses), width, dtype=torch.bool)
        lp = {name: torch.full((len(responses), width), float("nan")) for name in (*models, "sampled")}
        exact_kl = torch.zeros(len(responses), width)
        for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            n = len(response)
            mask[row, :n] = True
            lp["sampled"][row, :n] = torch.tensor(sampled[row])
            rows = {}
            for name, model in models.items():
                lp[name][row, :n], rows[name] = _teacher_forced(model, prompt, response)
            student_rows, teacher_rows = rows["student"], rows["teacher"]
            exact_kl[row, :n] = (student_rows.exp() * (student_rows - teacher_rows)).sum(-1)
        n_tokens = int(mask.sum())

        gap = (lp["sampled"] - lp["student"])[mask].abs().max().item()
        checks.append(
            Check(
                "selftest",
                "log-prob alignment",
                PASS if gap < 1e-4 else FAIL,
                f"sampling log-probs == one teacher-forced forward scored at position t-1 "
                f"(max |diff| {gap:.1e} over {n_tokens} tokens)",
            )
        )

        advantages, _ = compute_opd_advantage(lp["student"], lp["copy"], mask)
        zero = bool((advantages == 0).all())
        checks.append(
            Check(
                "selftest",
                "teacher == student copy",
                PASS if zero else FAIL,
                f"all {advantages.numel()} advantages exactly 0"
                if zero
                else f"advantages not 0: max |A| {advantages.abs().max().item():.3e}",
            )
        )

        advantages, _ = compute_opd_advantage(lp["student"], lp["teacher"], mask)
        kl = exact_kl[mask].mean().item()
        k1 = (lp["student"] - lp["teacher"])[mask].mean().item()
        checks.append(
            Check(
                "selftest",
                "distinct teacher",
                PASS if kl > 0 else FAIL,
                f"reverse KL {kl:.4f} nats/token (full vocabulary) > 0; k1 sample estimate {k1:.4f}",
            )
        )
        expected = (lp["teacher"] - lp["student"])[mask]
        err = (advantages[mask] - expected).abs().max().item()
        padding_zero = bool((advantages[~mask] == 0).all()) and bool(torch.isfinite(advantages).all())
        positive = advantages[mask & (lp["teacher"] > lp["student"])]
        sign_ok = bool((positive > 0).all())
        ok = err == 0 and padding_zero and sign_ok
        checks.append(
            Check(
                "selftest",
                "advantage = teacher - student",
                PASS if ok else FAIL,
                f"max error {err:.1e} on {n_tokens} response tokens, > 0 where the teacher prefers the token, "
                f"{'0' if padding_zero else 'NOT 0'} on {int((~mask).sum())} padding positions (NaN log-probs there)",
            )
        )
    return checks


# ------------------------------------------------------------------------------------------------ main


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor's options (shared by ``verify_opd_implementation.py`` and ``verl-opd doctor``)."""
    parser.add_argument("--student", help="student model directory (actor_rollout_ref.model.path)")
    parser.add_argument("--teacher", help="teacher model directory (opd.teacher.model_path)")
    parser.add_argument(
        "--config-name",
        "-cn",
        default=DEFAULT_CONFIG_NAME,
        help="verl config to compose: opd_trainer (default) or ppo_trainer (then add algorithm.adv_estimator=opd)",
    )
    parser.add_argument("--selftest", action="store_true", help="also run the CPU numeric self-test on tiny models")
    parser.add_argument(
        "--skip", action="append", default=[], choices=SECTIONS, help="skip a group of checks (repeatable)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to verl.trainer.main_ppo")


def add_doctor_parser(subparsers: argparse._SubParsersAction) -> None:
    """``verl-opd doctor``: the pre-flight checker as a ``verl-opd`` subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="pre-flight checks for an OPD run (versions, plugin, tokenizers, config, --selftest)",
        description=__doc__.split("\n\n")[0],
    )
    add_doctor_arguments(parser)
    parser.set_defaults(func=run_doctor)


def _model_paths(args: argparse.Namespace) -> tuple[str | None, str | None, list[str], list[Check]]:
    """Student and teacher from the flags, else from the overrides; flags replace such overrides."""
    overrides, notes = list(args.overrides), []
    paths = {}
    for flag, key in (("student", STUDENT_KEY), ("teacher", TEACHER_KEY)):
        given = getattr(args, flag)
        in_overrides = _override_value(overrides, key)
        if given is None:
            paths[flag] = os.path.expanduser(in_overrides) if in_overrides else None
            continue
        given = os.path.expanduser(given)
        if in_overrides is not None:
            overrides = [o for o in overrides if _override_value([o], key) is None]
            if in_overrides != given:
                notes.append(Check("config", key, WARN, f"--{flag} {given} replaces the override {key}={in_overrides}"))
        paths[flag] = given
    return paths["student"], paths["teacher"], overrides, notes


def run_doctor(args: argparse.Namespace, out: Callable[[str], None] | None = None) -> int:
    """Run the checks chosen by ``args``; print each result; return 1 if any FAILed, else 0."""
    out = out or (lambda text: print(text, flush=True))
    student, teacher, overrides, notes = _model_paths(args)
    skip = set(args.skip)
    have_models = student is not None or teacher is not None
    if not have_models and not args.selftest:
        out("FAIL  [doctor] nothing to check: pass --student PATH --teacher PATH (and/or --selftest)")
        return 2
    if not args.selftest:
        skip.add("selftest")
    if not have_models:
        skip |= {"tokenizers", "config"}

    out(f"verl-opd doctor (python {sys.executable})")
    results: list[Check] = []

    def report(checks: list[Check]) -> None:
        for check in checks:
            out(check.line())
        results.extend(checks)

    sections: list[tuple[str, Callable[[], list[Check]]]] = [
        ("versions", check_versions),
        ("plugin", check_plugin),
        ("tokenizers", lambda: check_tokenizers(student, teacher)),
        ("config", lambda: notes + check_config(overrides, args.config_name, student=student, teacher=teacher)),
        ("selftest", run_selftest),
    ]
    for name, run in sections:
        if name in skip:
            report([Check(name, "skipped", SKIP, "")])
            continue
        try:
            report(run())
        except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, not a crashed doctor
            report([Check(name, "crashed", FAIL, f"{type(exc).__name__}: {exc}")])

    counts = {status: sum(c.status == status for c in results) for status in (PASS, WARN, FAIL)}
    verdict = "NOT ready" if counts[FAIL] else "ready"
    out(f"doctor: {counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed: {verdict} for OPD")
    return 1 if counts[FAIL] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``verify_opd_implementation.py``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="verify_opd_implementation.py",
        description=__doc__.split("\n\n")[0],
        epilog="Options first, then Hydra overrides, e.g. trainer.device=cpu data.train_files=...",
    )
    add_doctor_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    return run_doctor(args)


if __name__ == "__main__":
    sys.exit(main())
