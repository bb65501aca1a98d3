"""``verl-opd doctor``: pre-flight checks for an OPD run, before any GPU time is spent.

Each check prints one line, ``PASS``, ``WARN``, ``FAIL`` or ``SKIP``, with its reason; the
exit code is 1 when any check failed. The checks, in order, one module each:

* ``versions`` (:mod:`.versions`): Python, verl, torch and transformers against the supported ranges.
* ``plugin`` (:mod:`.versions`): the ``verl.plugins`` entry point is installed, and in a FRESH
  Python process ``import verl`` loads the plugin without error and registers the ``opd``
  advantage estimator and the ``opd`` trainer (verl swallows plugin errors, so this is
  the only way to see them before a run).
* ``tokenizers`` (:mod:`.tokenizers`): student and teacher map text to the same ids, share
  special tokens and the chat template (:func:`verl_opd.checks.tokenizer_check.compare_tokenizers`).
* ``config`` (:mod:`.config`): the Hydra overrides compose into a verl config that verl-opd's
  driver hook (:func:`verl_opd.glue.driver.configure`) and verl's own ``validate_config`` accept,
  exactly as ``python -m verl.trainer.main_ppo`` would do at start-up; then the data files
  and the run's resources vs this machine, with the driver's own checks. Keys of the run
  that are not given (rollout engine, data files, devices) are ``SKIP``: not checked.
* ``plan`` (:mod:`.plan`, ``--plan``): per-GPU memory of the run in each phase (generation, the
  log-prob passes, the update) from both models' ``config.json`` and the overrides, whether the
  colocated teacher fits, and the highest ``gpu_memory_utilization`` that does
  (:mod:`verl_opd.checks.memory_plan`).
* ``selftest`` (:mod:`.selftest`, ``--selftest``): CPU numerics on tiny models built in a temp
  dir: teacher == student gives advantages of exactly 0, a distinct teacher a reverse KL > 0.

Usage::

    python verify_opd_implementation.py --student S --teacher T [--selftest] [hydra overrides...]
    verl-opd doctor --student S --teacher T [--config-name ppo_trainer] [hydra overrides...]
    verl-opd doctor --plan --gpu-memory-gib 79.6 --student S --teacher T [hydra overrides...]

Options come first, then the Hydra overrides (as with ``main_ppo``).
"""

from verl_opd.tools.doctor.cli import add_doctor_arguments, add_doctor_parser, main, run_doctor
from verl_opd.tools.doctor.config import check_config, compose_opd_config
from verl_opd.tools.doctor.report import SECTIONS, Check
from verl_opd.tools.doctor.selftest import permute_token_ids, run_selftest
from verl_opd.tools.doctor.tokenizers import check_tokenizers
from verl_opd.tools.doctor.versions import SUPPORTED_VERSIONS, check_plugin, check_versions

__all__ = [
    "Check",
    "SECTIONS",
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
