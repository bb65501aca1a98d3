"""A ``cpu`` platform for verl's :class:`~verl.plugin.platform.PlatformRegistry`.

verl resolves its device through a platform singleton. Without an accelerator it
falls back to ``nvidia`` and then fails everywhere. This platform makes verl's own
code paths run on host memory: tensors go to ``"cpu"``, collectives use gloo, and
Ray still schedules workers on a logical ``"GPU"`` resource, so the unchanged
placement logic (one worker per "GPU") keeps working when Ray is told that the
machine has N logical GPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from verl.plugin.platform import PlatformBase

from verl_opd.cpu import PLATFORM_NAME


class _CPUDeviceModule(ModuleType):
    """The subset of ``torch.cuda``'s module interface verl calls, as no-ops on host memory.

    verl calls ``get_torch_device().<fn>()`` in many places (memory stats, empty_cache,
    set_device, ...). ``torch.cpu`` lacks several of these, so unknown attributes fall
    back to ``torch.cpu`` and then to a harmless no-op returning 0.
    """

    def __init__(self) -> None:
        super().__init__("verl_opd_cpu_device")

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        # verl's flops counter looks the name up in a table keyed by strings.
        return "CPU"

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    def __getattr__(self, name: str) -> Any:
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)

        def _noop(*args: Any, **kwargs: Any) -> int:
            return 0

        return _noop


_DEVICE_MODULE = _CPUDeviceModule()


class PlatformCPU(PlatformBase):
    """verl platform backed by the host CPU (gloo collectives, logical Ray "GPU"s)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a CPU run is chosen explicitly (VERL_PLATFORM=cpu).
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

    def current_device(self) -> str:  # type: ignore[override]
        # verl moves tensors with ``.to(get_device_id())``; an int means "accelerator N" to
        # torch, so the CPU platform answers with the device string instead.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets this for actors holding a logical "GPU"; verl reads it back to
        # number workers. A CPU build of torch ignores it.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None
