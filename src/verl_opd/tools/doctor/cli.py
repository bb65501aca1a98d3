"""The doctor's command line (``verify_opd_implementation.py`` and ``verl-opd doctor``) and its run order."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from verl_opd.checks import overrides as hydra_overrides
from verl_opd.checks.inputs import STUDENT_KEY, TEACHER_KEY
from verl_opd.config.opd_config import VIEW_STUDENT
from verl_opd.tools.doctor.config import DEFAULT_CONFIG_NAME, check_config
from verl_opd.tools.doctor.plan import DEFAULT_GPU_MEMORY_GIB, check_plan
from verl_opd.tools.doctor.report import FAIL, PASS, SECTIONS, SKIP, SUMMARY, WARN, Check
from verl_opd.tools.doctor.selftest import run_selftest
from verl_opd.tools.doctor.tokenizers import check_tokenizers
from verl_opd.tools.doctor.versions import check_plugin, check_versions

# Which tokenizer checks apply (opd.teacher.view=own: two tokenizers aligned on bytes).
VIEW_KEY = "opd.teacher.view"


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
        "--plan",
        action="store_true",
        help="also print the per-GPU memory plan (needs only each model's config.json; see --gpu-memory-gib)",
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=DEFAULT_GPU_MEMORY_GIB,
        help=f"memory of one GPU for --plan, in GiB (default {DEFAULT_GPU_MEMORY_GIB}: an 80 GB H100)",
    )
    parser.add_argument(
        "--skip", action="append", default=[], choices=SECTIONS, help="skip a group of checks (repeatable)"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to verl.trainer.main_ppo")


def add_doctor_parser(subparsers: argparse._SubParsersAction) -> None:
    """``verl-opd doctor``: the pre-flight checker as a ``verl-opd`` subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="pre-flight checks for an OPD run (versions, plugin, tokenizers, config, --plan, --selftest)",
        description=SUMMARY,
    )
    add_doctor_arguments(parser)
    parser.set_defaults(func=run_doctor)


def _model_paths(args: argparse.Namespace) -> tuple[str | None, str | None, list[str], list[Check]]:
    """Student and teacher from the flags, else from the overrides; flags replace such overrides."""
    overrides, notes = list(args.overrides), []
    paths = {}
    for flag, key in (("student", STUDENT_KEY), ("teacher", TEACHER_KEY)):
        given = getattr(args, flag)
        in_overrides = hydra_overrides.value(overrides, key)
        if given is None:
            paths[flag] = os.path.expanduser(in_overrides) if in_overrides else None
            continue
        given = os.path.expanduser(given)
        if in_overrides is not None:
            overrides = hydra_overrides.without(overrides, key)
            if in_overrides != given:
                notes.append(Check("config", key, WARN, f"--{flag} {given} replaces the override {key}={in_overrides}"))
        paths[flag] = given
    return paths["student"], paths["teacher"], overrides, notes


def run_doctor(args: argparse.Namespace, out: Callable[[str], None] | None = None) -> int:
    """Run the checks chosen by ``args``; print each result; return 1 if any FAILed, else 0."""
    out = out or (lambda text: print(text, flush=True))
    try:
        student, teacher, overrides, notes = _model_paths(args)
    except Exception as exc:  # noqa: BLE001 - Hydra's OverrideParseException names the bad override
        out(f"FAIL  [doctor] the Hydra overrides do not parse: {exc}")
        return 2
    view = hydra_overrides.value(overrides, VIEW_KEY) or VIEW_STUDENT
    skip = set(args.skip)
    have_models = student is not None or teacher is not None
    if not have_models and not args.selftest:
        out("FAIL  [doctor] nothing to check: pass --student PATH --teacher PATH (and/or --selftest)")
        return 2
    if not args.selftest:
        skip.add("selftest")
    if not args.plan:
        skip.add("plan")
    if not have_models:
        skip |= {"tokenizers", "config", "plan"}

    out(f"verl-opd doctor (python {sys.executable})")
    results: list[Check] = []

    def report(checks: list[Check]) -> None:
        for check in checks:
            out(check.line())
        results.extend(checks)

    sections: list[tuple[str, Callable[[], list[Check]]]] = [
        ("versions", check_versions),
        ("plugin", check_plugin),
        ("tokenizers", lambda: check_tokenizers(student, teacher, view)),
        ("config", lambda: notes + check_config(overrides, args.config_name, student=student, teacher=teacher)),
        ("plan", lambda: check_plan(overrides, args.config_name, student, teacher, args.gpu_memory_gib)),
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
        description=SUMMARY,
        epilog="Options first, then Hydra overrides, e.g. trainer.device=cpu data.train_files=...",
    )
    add_doctor_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    return run_doctor(args)
