"""``plan`` (``--plan``): per-GPU memory of the run, phase by phase, from two ``config.json`` files and the overrides.

A thin front-end of :mod:`verl_opd.checks.memory_plan`: compose the run's config like the
``config`` group does (without the driver hook, so only ``config.json`` is needed), plan, and
print one table plus a ``PASS``/``WARN``/``FAIL`` line per phase.
"""

from __future__ import annotations

from collections.abc import Sequence

from verl_opd.checks.memory_plan import GIB, RESERVE_GIB, MemoryPlan, judge
from verl_opd.tools.doctor.report import FAIL, SKIP, WARN, Check

# What `nvidia-smi` shows for an 80 GB H100 (81559 MiB); pass --gpu-memory-gib for other cards.
DEFAULT_GPU_MEMORY_GIB = 79.6


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}" if value else "-"


def format_table(plan: MemoryPlan) -> str:
    """Components x phases in GiB per GPU, the totals, then host memory per node."""
    phases = plan.phases
    names = list(dict.fromkeys(c.name for phase in phases for c in phase.components))
    width = max(len(name) for name in [*names, "total"]) + 2
    columns = [max(len(phase.name), 6) + 2 for phase in phases]
    cluster = plan.inputs.cluster

    def row(label: str, cells: list[str]) -> str:
        return label.ljust(width) + "".join(cell.rjust(col) for cell, col in zip(cells, columns, strict=True))

    lines = [
        f"GiB per GPU ({cluster.nnodes} x {cluster.n_gpus_per_node} GPUs of {cluster.gpu_memory_gib:g} GiB, "
        f"{RESERVE_GIB:g} GiB reserved for what is not modelled)",
        row("", [phase.name for phase in phases]),
    ]
    for name in names:
        values = [sum(c.bytes for c in phase.components if c.name == name) for phase in phases]
        lines.append(row(name, [_gib(v) for v in values]))
    lines.append(row("total", [f"{phase.total / GIB:.1f}" for phase in phases]))
    hows: dict[str, dict[str, list[str]]] = {}
    for phase in phases:
        for c in phase.components:
            hows.setdefault(c.name, {}).setdefault(c.how, []).append(phase.name)
    lines.append("how each row is counted:")
    for name, by_how in hows.items():
        for how, where in by_how.items():
            phases_note = f" ({', '.join(where)})" if len(by_how) > 1 else ""
            lines.append(f"  {name}{phases_note}: {how}")
    return "\n".join(lines)


def plan_checks(plan: MemoryPlan) -> list[Check]:
    """The table, one verdict per phase, host memory, and any notes."""
    checks = [Check("plan", "memory per GPU", "PASS", format_table(plan))]
    checks += [Check("plan", name, v.status, v.reason) for name, v in judge(plan).items()]
    host = sum(c.bytes for c in plan.host)
    detail = "; ".join(f"{c.name} {c.bytes / GIB:.1f} GiB ({c.how})" for c in plan.host) or "nothing offloaded"
    checks.append(Check("plan", "host memory per node", "PASS", f"{host / GIB:.1f} GiB: {detail}"))
    checks += [Check("plan", "model", WARN, note) for note in plan.notes]
    return checks


def check_plan(
    overrides: Sequence[str],
    config_name: str,
    student: str | None,
    teacher: str | None,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
) -> list[Check]:
    """Compose the run's config, plan its memory, and report it as checks."""
    from omegaconf import OmegaConf

    from verl_opd.checks.memory_plan import MemoryPlanError, inputs_from_config, plan_memory
    from verl_opd.config.opd_config import OPDConfigError
    from verl_opd.tools.doctor.config import compose_opd_config

    try:
        config = compose_opd_config(overrides, config_name, student=student, teacher=teacher)
    except Exception as exc:  # noqa: BLE001 - Hydra's errors name the bad override; the config group explains
        return [Check("plan", "compose", FAIL, f"the overrides do not compose: {type(exc).__name__}: {exc}")]
    if OmegaConf.select(config, "trainer.device") == "cpu":
        return [Check("plan", "skipped", SKIP, "trainer.device=cpu: no GPU memory to plan")]
    try:
        plan = plan_memory(inputs_from_config(config, gpu_memory_gib))
    except (MemoryPlanError, OPDConfigError) as exc:
        return [Check("plan", "inputs", FAIL, str(exc))]
    return plan_checks(plan)
