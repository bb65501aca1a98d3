"""verl's ``verl.plugins`` entry point: runs at the first ``import verl`` in every process.

verl swallows exceptions raised here and logs them at DEBUG level only, so a broken
plugin would silently leave ``algorithm.adv_estimator=opd`` undefined. This module
therefore catches its own failures, prints each traceback to stderr in every process
that loads it, and records it.

The two parts load independently. The CPU backend (a platform and a rollout server
for ``trainer.device=cpu``, which writes one private table of verl's) goes first,
because registering a platform must precede any import that resolves verl's device
platform; its failure is recorded in :data:`CPU_BACKEND_ERROR` and only costs the CPU
backend. OPD itself (the estimator, the driver hook, the trainer) then loads whatever
happened to the CPU backend, so GPU machines never lose ``opd`` to it; its failure is
:data:`LOAD_ERROR`, and verl then refuses the unknown estimator while the printed
traceback says why.
"""

from __future__ import annotations

import sys
import traceback

LOAD_ERROR: str | None = None
CPU_BACKEND_ERROR: str | None = None


def _load_cpu_backend() -> None:
    from verl_opd import cpu

    cpu.register()


def _load_opd() -> None:
    from verl_opd.glue import driver, estimator
    from verl_opd.glue.import_hooks import after_import

    estimator.register()
    driver.install()
    after_import("verl.trainer.ppo.v1", lambda _module: _register_trainer())


def _register_trainer() -> None:
    import verl_opd.glue.trainer  # noqa: F401  (registers trainer_mode "opd")


def _loud(what: str) -> str:
    error = traceback.format_exc()
    print(f"verl-opd: FAILED to load {what}.\n{error}", file=sys.stderr)
    return error


try:
    _load_cpu_backend()
except Exception:  # noqa: BLE001 - verl would hide it; make it loud instead
    CPU_BACKEND_ERROR = _loud("its CPU backend; trainer.device=cpu is unavailable, OPD on GPUs is not affected")

try:
    _load_opd()
except Exception:  # noqa: BLE001 - verl would hide it; make it loud instead
    LOAD_ERROR = _loud("its verl plugin; OPD is unavailable")
