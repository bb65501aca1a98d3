"""verl's ``verl.plugins`` entry point: runs at the first ``import verl`` in every process.

verl swallows exceptions raised here and logs them at DEBUG level only, so a broken
plugin would silently leave ``algorithm.adv_estimator=opd`` undefined. This module
therefore catches its own failure, prints the traceback to stderr in every process
that loads it, and records it in :data:`LOAD_ERROR`. Because registering ``opd`` is
part of the load, an OPD run can never proceed without the plugin: verl refuses
the unknown estimator, and the printed traceback says why.
"""

from __future__ import annotations

import sys
import traceback

LOAD_ERROR: str | None = None


def _load() -> None:
    from verl_opd import cpu, driver, estimator
    from verl_opd.import_hooks import after_import

    cpu.register()  # first: later imports may resolve verl's platform
    estimator.register()
    driver.install()
    after_import("verl.trainer.ppo.v1", lambda _module: _register_trainer())


def _register_trainer() -> None:
    import verl_opd.trainer  # noqa: F401  (registers trainer_mode "opd")


try:
    _load()
except Exception:  # noqa: BLE001 - verl would hide it; make it loud instead
    LOAD_ERROR = traceback.format_exc()
    print(f"verl-opd: FAILED to load its verl plugin; OPD is unavailable.\n{LOAD_ERROR}", file=sys.stderr)
