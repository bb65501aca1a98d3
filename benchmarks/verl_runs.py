"""Running ``python -m verl.trainer.main_ppo`` as a measured subprocess (shared by the benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from process_tree import PeakTreeRSS  # benchmarks/ is on sys.path when a benchmark is run

# verl's per-stage timers of a step (timing_s/<stage>); their sum is about timing_s/step
STAGES = ("gen", "old_log_prob", "ref", "adv", "update_actor", "update_weights")
RUN_TIMEOUT_S = 1800


def run_measured(
    command: list[str], cwd: Path, log_path: Path, timeout_s: float = RUN_TIMEOUT_S
) -> tuple[int, str, float, float]:
    """Run ``command`` (output to ``log_path``); (exit code, output, wall seconds, peak tree RSS in GiB).

    A run past ``timeout_s``, or interrupted, has its whole process group killed (Ray's workers included).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with PeakTreeRSS(proc.pid) as memory:
            try:
                proc.wait(timeout=timeout_s)
            except BaseException as error:  # a timeout, or Ctrl-C: stop the whole tree this run started
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
                if not isinstance(error, subprocess.TimeoutExpired):
                    raise
    return proc.returncode, log_path.read_text(errors="replace"), time.monotonic() - start, memory.peak_gib
