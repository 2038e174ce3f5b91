"""What a machine has: CPU, RAM, the data dir's disk, and GPUs (torch.cuda and NVML, both optional).

``ProbeSource`` is the interface the agent uses; ``SystemProbe`` reads the machine, ``StaticProbe``
reads a JSON file (``STRATA_INVENTORY_PROBE_FILE``) so that tests and demos script a node.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field, ValidationError

from shared.errors import Invalid
from shared.events import DeviceInfo
from shared.host_memory import parse_meminfo

log = logging.getLogger(__name__)


class ProbeResult(BaseModel):
    hostname: str
    cpu_model: str
    cpu_cores: int = Field(ge=1)
    ram_total: int = Field(ge=0)
    ram_free: int = Field(ge=0)
    disk_total: int = Field(default=0, ge=0)
    disk_free: int = Field(default=0, ge=0)
    gpus: list[DeviceInfo] = []
    utilisation: dict[str, float] = {}
    labels: dict[str, str] = {}
    node_id: str | None = Field(default=None, description="a scripted node's identity; else the data dir's")

    def devices(self) -> list[DeviceInfo]:
        """Every placement target: the CPU (its RAM) and each GPU."""
        cpu = DeviceInfo(
            id="cpu", kind="cpu", name=self.cpu_model, memory_total=self.ram_total, memory_free=self.ram_free
        )
        return [cpu, *self.gpus]


class ProbeSource(Protocol):
    def probe(self) -> ProbeResult: ...


class StaticProbe:
    """A node described by a JSON file (a ProbeResult). Read again on each probe, so a test may edit it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.probe()  # fail at start, not at the first heartbeat

    def probe(self) -> ProbeResult:
        try:
            return ProbeResult.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            raise Invalid(f"probe file {self.path} does not exist") from None
        except ValidationError as exc:
            raise Invalid(
                f"probe file {self.path} is not a valid probe: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
            ) from None


class SystemProbe:
    def __init__(self, data_dir: Path, labels: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.labels = labels or {}
        self._last_cpu: tuple[int, int] | None = None

    def probe(self) -> ProbeResult:
        meminfo = parse_meminfo(_read("/proc/meminfo"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(self.data_dir)
        gpus = nvml_gpus() or torch_gpus()
        utilisation = {}
        cpu = self._cpu_utilisation()
        if cpu is not None:
            utilisation["cpu"] = cpu
        utilisation.update({g.id: u for g, u in nvml_utilisation()})
        return ProbeResult(
            hostname=socket.gethostname(),
            cpu_model=parse_cpu_model(_read("/proc/cpuinfo")),
            cpu_cores=os.cpu_count() or 1,
            ram_total=meminfo.get("MemTotal", 0),
            ram_free=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
            disk_total=disk.total,
            disk_free=disk.free,
            gpus=gpus,
            utilisation=utilisation,
            labels=self.labels,
        )

    def _cpu_utilisation(self) -> float | None:
        """Busy share of all CPUs since the previous probe, from /proc/stat."""
        line = _read("/proc/stat").split("\n", 1)[0].split()
        if not line or line[0] != "cpu":
            return None
        values = [int(v) for v in line[1:]]
        idle, total = values[3] + (values[4] if len(values) > 4 else 0), sum(values)
        previous, self._last_cpu = self._last_cpu, (idle, total)
        if previous is None or total == previous[1]:
            return None
        return round(1 - (idle - previous[0]) / (total - previous[1]), 4)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def parse_cpu_model(text: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Hardware", "cpu model", "Processor") and value.strip():
            return value.strip()
    return "unknown CPU"


def torch_gpus() -> list[DeviceInfo]:
    """GPUs as torch sees them; none when torch is absent or has no CUDA."""
    try:
        import torch
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(
                DeviceInfo(
                    id=f"cuda:{i}",
                    kind="cuda",
                    name=props.name,
                    memory_total=total,
                    memory_free=free,
                    uuid=str(getattr(props, "uuid", "")) or None,
                    compute_capability=f"{props.major}.{props.minor}",
                    driver=torch.version.cuda and f"cuda {torch.version.cuda}",
                )
            )
        return gpus
    except Exception as exc:  # a broken driver must not stop a CPU node from joining
        log.warning("torch.cuda probe failed: %s", exc)
        return []


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def nvml_gpus() -> list[DeviceInfo]:
    """GPUs as the driver (NVML) sees them: memory of every process, the driver version, the uuid."""
    nv = _nvml()
    if nv is None:
        return []
    try:
        driver = _text(nv.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                DeviceInfo(
                    id=f"cuda:{i}",
                    kind="cuda",
                    name=_text(nv.nvmlDeviceGetName(handle)),
                    memory_total=mem.total,
                    memory_free=mem.free,
                    uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                    compute_capability=f"{major}.{minor}",
                    driver=driver,
                )
            )
        return gpus
    except Exception as exc:
        log.warning("NVML probe failed: %s", exc)
        return []


def nvml_utilisation() -> list[tuple[DeviceInfo, float]]:
    nv = _nvml()
    if nv is None:
        return []
    try:
        return [
            (
                DeviceInfo(id=f"cuda:{i}", kind="cuda", name="", memory_total=0, memory_free=0),
                nv.nvmlDeviceGetUtilizationRates(nv.nvmlDeviceGetHandleByIndex(i)).gpu / 100,
            )
            for i in range(nv.nvmlDeviceGetCount())
        ]
    except Exception:
        return []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
