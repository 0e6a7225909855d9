"""What the engine runs on: the device's name and memory, for the bot's preflight check and /status.

The bot never imports torch itself; it asks here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models import resolve_device

GIB = 2**30


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cuda:0", "mps" or "cpu"
    name: str  # "NVIDIA H200", "CPU, 16 threads"
    accelerator: bool  # False for the CPU
    memory_used: int | None  # bytes in use on the whole device (every process); None if unknown
    memory_total: int | None
    build: str  # torch version and the CUDA it was built for: what a driver must support

    @property
    def memory_text(self) -> str:
        if self.memory_used is None or self.memory_total is None:
            return "memory unknown"
        return f"{self.memory_used / GIB:.1f} of {self.memory_total / GIB:.1f} GiB used"


def describe_device(name: str = "auto") -> DeviceInfo:
    """Describe the device `name` (as ENGINE_DEVICE takes it); ValueError says why it is unusable."""
    build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
    try:
        device = resolve_device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: no CUDA GPU is visible to {build}; check the NVIDIA driver "
                             "(nvidia-smi) and, in a container, the GPU reservation")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"{name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo(f"cuda:{index}", torch.cuda.get_device_name(index), True, total - free, total,
                          build)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{name}: Apple's Metal (MPS) is not available to {build}")
        total = getattr(torch.mps, "recommended_max_memory", lambda: None)()
        return DeviceInfo("mps", "Apple GPU (MPS)", True, torch.mps.driver_allocated_memory(), total, build)
    if device.type == "cpu":
        used, total = _system_memory()
        return DeviceInfo("cpu", f"CPU, {torch.get_num_threads()} threads", False, used, total, build)
    raise ValueError(f"{name}: the engine runs on cuda, mps or cpu, not {device.type}")


def _system_memory() -> tuple[int | None, int | None]:
    """RAM in use and in all, from /proc/meminfo (Linux); unknown elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(fields["MemTotal"].split()[0]) * 1024
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, None
    return total - available, total
