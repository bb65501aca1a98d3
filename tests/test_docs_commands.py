"""Every CPU command in README.md and OPD_QUICKSTART.md runs as written.

A runnable block is marked by an HTML comment on the line before its fence:
``<!-- cpu-test VAR=value ... -->``. The variables are the documented short form
(e.g. ``OPD_STEPS=2``). Identical blocks run once.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from verl_opd.tools.console_metrics import parse_step_metrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "OPD_QUICKSTART.md")
MARKED_BLOCK = re.compile(r"<!-- cpu-test(?P<env>[^>]*)-->\n```bash\n(?P<body>.*?)```", re.S)
ANY_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
CPU_HINTS = ("trainer.device=cpu", "run_tiny_opd_cpu.sh")


def _marked_blocks() -> dict[tuple[str, str], list[str]]:
    blocks: dict[tuple[str, str], list[str]] = {}
    for doc in DOCS:
        for match in MARKED_BLOCK.finditer((ROOT / doc).read_text()):
            blocks.setdefault((match["env"].strip(), match["body"]), []).append(doc)
    return blocks


def test_every_cpu_command_in_the_docs_is_marked_runnable():
    marked = {body for _, body in _marked_blocks()}
    for doc in DOCS:
        for body in ANY_BLOCK.findall((ROOT / doc).read_text()):
            if any(hint in body for hint in CPU_HINTS):
                assert body in marked, f"{doc}: CPU command block is not marked <!-- cpu-test -->:\n{body}"
    assert marked, "no runnable CPU block found"


@pytest.mark.e2e
@pytest.mark.parametrize(("env", "body"), list(_marked_blocks()), ids=lambda v: v[:40] if isinstance(v, str) else v)
def test_documented_cpu_command_runs(env, body, tmp_path):
    extra = dict(item.split("=", 1) for item in shlex.split(env))
    run_env = {**os.environ, **extra, "OPD_TINY_DIR": str(tmp_path / "tiny")}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    steps = parse_step_metrics(output)
    if "OPD_STEPS" in extra:
        assert sorted(steps) == list(range(1, int(extra["OPD_STEPS"]) + 1)), output[-3000:]
        assert all("opd/reverse_kl" in metrics for metrics in steps.values())
