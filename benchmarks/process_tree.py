"""Peak memory sampled from outside (shared by the benchmarks): the resident memory of a whole process tree.

``ray.init`` starts Ray's daemons as children of the driver and the workers are children of the raylet,
so the tree under ``main_ppo``'s driver is the whole run: model copies, Ray, TransferQueue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

import psutil


def tree_rss(root: psutil.Process) -> int:
    """Bytes resident in ``root`` and all its descendants now (processes that just exited are skipped)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakSampler:
    """Context manager: samples ``measure()`` (bytes) every ``interval_s`` until exit; ``peak_gib`` after."""

    def __init__(self, measure: Callable[[], int], interval_s: float = 0.5) -> None:
        self._measure = measure
        self._interval_s = interval_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_bytes = 0

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_bytes = max(self.peak_bytes, self._measure())
            self._done.wait(self._interval_s)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()


class PeakTreeRSS(PeakSampler):
    """:class:`PeakSampler` of :func:`tree_rss` under ``pid``."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        root = psutil.Process(pid)
        super().__init__(lambda: tree_rss(root), interval_s)
