"""Driver-side configuration: the one place where verl-opd edits a composed config.

Every verl entry point (``main_ppo`` and friends) calls
``verl.utils.device.auto_set_device(config)`` first, right after Hydra composed the
config and before ``validate_config``. :func:`install` hooks :func:`configure` in
there (the wrapper itself lives in :mod:`verl_opd.glue.patches`), so the switches
verl-opd adds take effect, and every run through it is checked before Ray starts:

* ``trainer.device=cpu``: CPU defaults for the device keys the command line does not
  set (:func:`verl_opd.checks.resources.apply_cpu_defaults`), then
  :func:`verl_opd.cpu.settings.apply_cpu_settings`.
* the student's weights (:mod:`verl_opd.checks.inputs`).
* ``algorithm.adv_estimator=opd``: :func:`verl_opd.config.opd_config.apply_opd_settings`.
* what the run asks of Ray vs this machine (:func:`verl_opd.checks.resources.check_resources`)
  and the data files (:mod:`verl_opd.checks.inputs`), whose ``data_source`` values every teacher of
  ``opd.teachers`` must cover between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf


def configure(config: Any, overrides: Sequence[str] | None = None, *, check_environment: bool = True) -> None:
    """Apply verl-opd's settings to a composed verl config and refuse what cannot run (a no-op for other configs).

    ``overrides``: the command line's Hydra overrides, when the caller knows them (the doctor);
    by default they are read from the running ``@hydra.main`` application. They decide which
    device keys the user set. ``check_environment=False`` leaves out the checks of data files
    and of this machine's resources, for a caller that reports those itself (the doctor).
    """
    if not isinstance(config, DictConfig) or OmegaConf.select(config, "trainer.device") is None:
        return
    from verl_opd.checks.inputs import DATA_KEYS, check_data_files, check_student, check_teacher_routing
    from verl_opd.checks.resources import apply_cpu_defaults, check_resources

    if overrides is None:
        from verl_opd.checks.overrides import from_hydra

        overrides = from_hydra()
    if config.trainer.device == "cpu":
        from verl_opd.cpu.settings import activate_cpu_platform, apply_cpu_settings

        apply_cpu_defaults(config, overrides)
        apply_cpu_settings(config)
        activate_cpu_platform()
    check_student(config)
    if OmegaConf.select(config, "algorithm.adv_estimator") == "opd":
        from verl_opd.config.opd_config import apply_opd_settings

        apply_opd_settings(config)
    if check_environment:
        check_resources(config)
        for key in DATA_KEYS:
            check_data_files(config, key)
        check_teacher_routing(config)


def install() -> None:
    """Hook :func:`configure` into verl's entry points, and give verl's placement groups a deadline."""
    from verl_opd.glue.import_hooks import after_import
    from verl_opd.glue.patches import install_config_hook, install_placement_timeout

    install_config_hook(configure)
    after_import("verl.single_controller.ray.base", install_placement_timeout)
