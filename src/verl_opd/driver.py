"""Driver-side configuration: the one place where verl-opd edits a composed config.

Every verl entry point (``main_ppo`` and friends) calls
``verl.utils.device.auto_set_device(config)`` first, right after Hydra composed the
config and before ``validate_config``. :func:`install` hooks :func:`configure` in
there (the wrapper itself lives in :mod:`verl_opd.patches`), so the switches
verl-opd adds take effect:

* ``trainer.device=cpu``: :func:`verl_opd.cpu.settings.apply_cpu_settings`.
* ``algorithm.adv_estimator=opd``: :func:`verl_opd.opd_config.apply_opd_settings`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def configure(config: Any) -> None:
    """Apply verl-opd's settings to a composed verl config (a no-op for other configs)."""
    if not isinstance(config, DictConfig) or OmegaConf.select(config, "trainer.device") is None:
        return
    if config.trainer.device == "cpu":
        from verl_opd.cpu.settings import activate_cpu_platform, apply_cpu_settings

        apply_cpu_settings(config)
        activate_cpu_platform()
    if OmegaConf.select(config, "algorithm.adv_estimator") == "opd":
        from verl_opd.opd_config import apply_opd_settings

        apply_opd_settings(config)


def install() -> None:
    """Hook :func:`configure` into verl's entry points (see :mod:`verl_opd.patches`)."""
    from verl_opd.patches import install_config_hook

    install_config_hook(configure)
