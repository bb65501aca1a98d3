"""verl-opd: on-policy distillation for verl.

Installing this package adds ``algorithm.adv_estimator=opd`` to every verl process
(through verl's ``verl.plugins`` entry point, see :mod:`verl_opd.plugin`) and a CPU
backend for verl's real trainer (:mod:`verl_opd.cpu`).
"""

from verl_opd.advantage import compute_opd_advantage

__all__ = ["compute_opd_advantage"]
__version__ = "0.1.0"
