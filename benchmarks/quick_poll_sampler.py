"""verl's sync replay buffer, looking for finished rollouts every ``sampler_kwargs.poll_interval_s`` seconds.

verl-opd's trainer polls every ``opd.sampler_poll_s`` (default 0.2 s) where verl's sync trainer waits a fixed
2 s. ``opd_vs_rl.py`` plugs this class into the GRPO and verl-distillation runs through verl's own
custom-sampler hook (``trainer.v1.sampler.custom_sampler``), so every method's step time is measured at the
same poll interval and differences come from the methods, not from the wait. (verl gives a custom sampler
no DAPO settings; none of the benchmark's runs filters groups.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer


class QuickPollReplayBuffer(ReplayBuffer):
    """:class:`ReplayBuffer` with its poll interval taken from ``sampler_kwargs.poll_interval_s``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.poll_interval = float(self.sampler_kwargs.get("poll_interval_s", self.poll_interval))


def quick_poll_overrides(poll_s: float) -> list[str]:
    """``main_ppo`` overrides that give one of verl's own trainers this sampler, polling every ``poll_s``."""
    return [
        f"trainer.v1.sampler.custom_sampler.path={Path(__file__).resolve()}",
        f"trainer.v1.sampler.custom_sampler.name={QuickPollReplayBuffer.__name__}",
        f"+trainer.v1.sampler.sampler_kwargs.poll_interval_s={poll_s}",
    ]
