"""The plugin reaches every verl process on its own, and its failure cannot go unnoticed."""

from __future__ import annotations

import subprocess
import sys

FIND_OPD = (
    "import verl\n"
    "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
    "print(get_adv_estimator_fn('opd').__module__)\n"
)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=False)


def test_fresh_process_finds_opd_without_importing_verl_opd():
    proc = _python(FIND_OPD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "verl_opd.glue.estimator"


def test_broken_plugin_is_loud_and_opd_stays_unavailable():
    # Make the OPD math unimportable, as a broken install would.
    code = "import sys\nsys.modules['verl_opd.core.advantage'] = None\n" + FIND_OPD
    proc = _python(code)
    assert proc.returncode != 0
    assert "verl-opd: FAILED to load its verl plugin" in proc.stderr
    assert "opd" in proc.stderr.splitlines()[-1]  # verl refuses the unknown estimator


def test_broken_cpu_backend_is_loud_and_opd_stays_available():
    # The CPU backend's platform module fails to import (as on a machine where it breaks); OPD must not go with it.
    code = (
        "import sys\nsys.modules['verl_opd.cpu.platform'] = None\n"
        + FIND_OPD
        + (
            "import verl_opd.glue.plugin as p\n"
            "from verl.plugin.platform import PlatformRegistry\n"
            "print(p.LOAD_ERROR is None, p.CPU_BACKEND_ERROR is not None, PlatformRegistry.get('cpu') is None)\n"
        )
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verl-opd: FAILED to load its CPU backend" in proc.stderr
    assert "FAILED to load its verl plugin" not in proc.stderr
    assert proc.stdout.split() == ["verl_opd.glue.estimator", "True", "True", "True"]


def test_trainer_is_registered_when_verl_imports_its_trainer_package():
    proc = _python(
        "import verl\n"
        "import sys\n"
        "assert 'verl_opd.glue.trainer' not in sys.modules  # deferred: verl's trainer package is heavy\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "print(get_trainer_cls('opd').__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "OPDTrainer"


def test_config_hook_wraps_verls_entry_points_once():
    proc = _python(
        "import verl, verl.utils.device as device\n"
        "import verl.trainer.main_ppo as main_ppo\n"
        "from verl_opd.glue import driver\n"
        "hook = device.auto_set_device\n"
        "driver.install(); driver.install()\n"
        "assert device.auto_set_device is hook and main_ppo.auto_set_device is hook\n"
        "assert hook._verl_opd_patched and hook.__wrapped__.__module__ == 'verl.utils.device'\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok"
