"""Driver-side configuration: the one place where verl-opd edits a composed config.

Every verl entry point (``main_ppo`` and friends) calls
``verl.utils.device.auto_set_device(config)`` first, right after Hydra composed the
config and before ``validate_config``. :func:`install` wraps that function so the
switches verl-opd adds take effect there:

* ``trainer.device=cpu``: :func:`verl_opd.cpu.settings.apply_cpu_settings`.
* ``algorithm.adv_estimator=opd``: :func:`verl_opd.opd_config.apply_opd_settings`.
"""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import DictConfig, OmegaConf

_MARKER = "_verl_opd_configure"


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
    """Wrap ``verl.utils.device.auto_set_device`` with :func:`configure` (idempotent)."""
    import verl.utils.device as device

    original = device.auto_set_device
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def auto_set_device(config: Any) -> None:
        configure(config)
        original(config)

    setattr(auto_set_device, _MARKER, True)
    device.auto_set_device = auto_set_device
