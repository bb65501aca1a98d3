"""``versions`` and ``plugin``: the installed stack, and verl loading verl-opd in a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

from verl_opd.tools.doctor.report import FAIL, PASS, Check

# What verl-opd is built and tested against (pyproject.toml pins the same ranges).
SUPPORTED_VERSIONS: tuple[tuple[str, str], ...] = (
    ("python", ">=3.10,<3.13"),
    ("verl", "==0.9.1"),
    ("torch", ">=2.6"),
    ("transformers", ">=5.5.3,<5.11"),
)

PLUGIN_TIMEOUT_S = 600


def _installed_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def check_versions() -> list[Check]:
    """Python, verl, torch and transformers against :data:`SUPPORTED_VERSIONS`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    checks = []
    for name, spec in SUPPORTED_VERSIONS:
        if name == "python":
            installed: str | None = ".".join(str(part) for part in sys.version_info[:3])
        else:
            installed = _installed_version(name)
        if installed is None:
            checks.append(Check("versions", name, FAIL, f"not installed; supported {spec}: pip install '{name}{spec}'"))
            continue
        try:
            ok = Version(installed) in SpecifierSet(spec, prereleases=True)
        except InvalidVersion:
            ok = False
        detail = f"{installed} (supported {spec})"
        if not ok:
            fix = "use Python 3.10-3.12" if name == "python" else f"pip install '{name}{spec}'"
            detail += f": unsupported, {fix}"
        checks.append(Check("versions", name, PASS if ok else FAIL, detail))
    return checks


# ----------------------------------------------------------------------------------------------- plugin

# Runs in a fresh interpreter: exactly what every verl process does at its first ``import verl``.
_PLUGIN_PROBE = r"""
import json, sys, traceback
out = {}
def step(name, fn):
    try:
        out[name] = {"ok": True, "detail": fn()}
    except BaseException as exc:
        out[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}".strip()}
import verl
out["verl"] = {"ok": True, "detail": getattr(verl, "__version__", "?")}
out["loaded_by_verl"] = {"ok": "verl_opd.glue.plugin" in sys.modules, "detail": ""}
def estimator():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    fn = get_adv_estimator_fn("opd")
    return f"{fn.__module__}.{fn.__qualname__}"
step("estimator", estimator)
def plugin():
    import verl_opd.glue.plugin as p
    assert p.LOAD_ERROR is None, p.LOAD_ERROR.strip().splitlines()[-1]
    return "verl_opd.glue.plugin.LOAD_ERROR is None"
step("plugin", plugin)
def trainer():
    from verl.trainer.ppo.v1 import get_trainer_cls
    cls = get_trainer_cls("opd")
    return f"{cls.__module__}.{cls.__qualname__}"
step("trainer", trainer)
print("VERL_OPD_PROBE " + json.dumps(out), flush=True)
"""


def _entry_point_checks() -> list[Check]:
    from importlib.metadata import entry_points

    ours = [ep for ep in entry_points(group="verl.plugins") if ep.value.split(":")[0] == "verl_opd.glue.plugin"]
    if not ours:
        return [
            Check(
                "plugin",
                "entry point",
                FAIL,
                "no verl.plugins entry point for verl_opd.glue.plugin in this environment: install the package "
                "(pip install -e . in the verl-opd checkout) into the Python that runs verl",
            )
        ]
    checks = [Check("plugin", "entry point", PASS, f"verl.plugins: {ours[0].name} = {ours[0].value}")]
    policy = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto").strip().lower()
    allowed = policy == "auto" or (policy != "none" and ours[0].name in {p.strip() for p in policy.split(",")})
    if not allowed:
        checks.append(
            Check(
                "plugin",
                "VERL_USE_EXTERNAL_PLUGINS",
                FAIL,
                f"VERL_USE_EXTERNAL_PLUGINS={policy!r} stops verl from loading verl-opd: unset it, or add "
                f"{ours[0].name!r} to its comma-separated list",
            )
        )
    return checks


def check_plugin(python: str = sys.executable, timeout_s: float = PLUGIN_TIMEOUT_S) -> list[Check]:
    """The entry point is installed, and a fresh ``import verl`` registers ``opd`` (estimator and trainer)."""
    checks = _entry_point_checks()
    if any(c.status == FAIL and c.name == "entry point" for c in checks):
        return checks
    try:
        proc = subprocess.run(
            [python, "-c", _PLUGIN_PROBE], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return [*checks, Check("plugin", "fresh process", FAIL, f"`import verl` did not finish in {timeout_s:.0f} s")]
    found = re.search(r"^VERL_OPD_PROBE (.*)$", proc.stdout, re.MULTILINE)
    if not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        return [
            *checks,
            Check("plugin", "fresh process", FAIL, f"`import verl` failed (exit {proc.returncode}):\n{tail}"),
        ]
    probe: dict[str, dict[str, Any]] = json.loads(found.group(1))
    stderr_tail = "\n".join(proc.stderr.strip().splitlines()[-8:])

    plugin = probe["plugin"]
    if plugin["ok"] and probe["loaded_by_verl"]["ok"]:
        checks.append(Check("plugin", "loads in a fresh process", PASS, f"import verl {probe['verl']['detail']}"))
    elif plugin["ok"]:
        checks.append(
            Check(
                "plugin",
                "loads in a fresh process",
                FAIL,
                "`import verl` did not load verl_opd.glue.plugin (entry points disabled? stale install?): "
                "reinstall with pip install -e . and unset VERL_USE_EXTERNAL_PLUGINS",
            )
        )
    else:
        detail = f"verl_opd.glue.plugin failed to load: {plugin['detail']}"
        if stderr_tail:
            detail += f"\n{stderr_tail}"
        checks.append(Check("plugin", "loads in a fresh process", FAIL, detail))

    checks.append(_registration_check("advantage estimator 'opd'", "algorithm.adv_estimator=opd", probe["estimator"]))
    checks.append(_registration_check("trainer 'opd'", "trainer.v1.trainer_mode=opd", probe["trainer"]))
    return checks


def _registration_check(name: str, key: str, result: dict[str, Any]) -> Check:
    """PASS when the fresh process found ``name`` in verl's registry, else FAIL naming the key verl would refuse."""
    if result["ok"]:
        return Check("plugin", name, PASS, f"registered: {result['detail']}")
    return Check("plugin", name, FAIL, f"verl does not know {key}: {result['detail']}")
