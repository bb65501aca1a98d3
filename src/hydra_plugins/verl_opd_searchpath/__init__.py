"""Hydra search-path plugin: makes ``--config-name=opd_trainer`` work with stock ``verl.trainer.main_ppo``.

Hydra imports every module under the ``hydra_plugins`` namespace package and calls
each :class:`SearchPathPlugin`; this one appends verl-opd's packaged configs.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class VerlOPDSearchPathPlugin(SearchPathPlugin):
    """Add ``pkg://verl_opd.config`` after the application's own config path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="verl-opd", path="pkg://verl_opd.config")
