"""verl-opd: on-policy distillation for verl.

Installing this package adds ``algorithm.adv_estimator=opd`` to every verl process
(through verl's ``verl.plugins`` entry point, see :mod:`verl_opd.glue.plugin`) and a CPU
backend for verl's real trainer (:mod:`verl_opd.cpu`).

Nothing is imported eagerly here: verl imports ``verl_opd.glue.plugin`` through this
package, and an import error raised at this level would escape the plugin's own
loud error handling (verl swallows it).
"""

from typing import Any

__all__ = ["compute_opd_advantage"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``verl_opd.compute_opd_advantage``, imported on first use."""
    if name == "compute_opd_advantage":
        from verl_opd.core.advantage import compute_opd_advantage

        return compute_opd_advantage
    raise AttributeError(f"module 'verl_opd' has no attribute {name!r}")
