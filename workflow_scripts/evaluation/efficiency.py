"""Resource sampling for inference runs, the FLARE way.

FLARE ranks efficiency by wall time, peak GPU memory and the area under the GPU-memory-time curve, sampled every
0.1 s. :class:`ResourceSampler` records those around one case. On CUDA it samples, through NVML, the memory of *this
process* on *the GPU it computes on*: NVML numbers devices in its own order (it ignores CUDA_VISIBLE_DEVICES, which
SLURM and multi-GPU nodes set), so the GPU is found by the PCI bus id torch reports, and the card's total used memory
would count every other job on a shared GPU. PyTorch's own allocator peak is recorded beside it. Whenever the GPU
cannot be sampled that way the sampler falls back (whole-device memory, or process RSS), says which in
``memory_kind`` and logs a warning naming the cause, so a surprising column is explained in the job's log.
:func:`measure_cases` runs a prediction shard's cases under it and returns the per-case efficiency table
(:data:`EFFICIENCY_COLUMNS`: the paper's Table 6 plus the GPU details) that every prediction job writes with
:func:`write_efficiency_table` and :mod:`workflow_scripts.evaluation.efficiency_report` collects.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Sequence

import pandas as pd
import psutil

from ..io.volumes import atomic_path

log = logging.getLogger(__name__)

# the paper's Table 6: case id, seconds, peak memory (MB), memory-time area (MB*s), size XxYxZ, and what the memory
# is (MEMORY_KINDS); the report and its figures read these
TABLE6_COLUMNS = ["Name", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "ImageSize", "MemoryKind"]
# beside them: PyTorch's allocator peak on the GPU (MB; empty on CPU) and the sampled GPU's PCI bus id (empty on CPU)
GPU_DETAIL_COLUMNS = ["MaxTorch_Mem", "GPU_BusId"]
EFFICIENCY_COLUMNS = TABLE6_COLUMNS + GPU_DETAIL_COLUMNS
MEMORY_KINDS = {
    "gpu": "this process's memory on its GPU (NVML, CUDA context included, as FLARE counts it)",
    "gpu_device": "all memory used on the process's GPU (NVML could not attribute memory to this process)",
    "rss": "the process's resident memory (a CPU run, or no usable GPU/NVML: the log says why)",
}


@dataclass(frozen=True)
class Usage:
    time_s: float
    peak_mem_mb: float
    auc_mem_mb_s: float
    memory_kind: str  # a key of MEMORY_KINDS
    torch_peak_mb: float = math.nan  # torch.cuda.max_memory_allocated over the block; NaN without CUDA
    gpu_bus_id: str = ""  # PCI bus id of the sampled GPU; empty when no GPU was sampled


class PciLocation(NamedTuple):
    """Where a GPU sits on the PCI bus: the identity torch and NVML share, whatever order each numbers GPUs in."""

    domain: int
    bus: int
    device: int

    @property
    def bus_id(self) -> str:
        """The bus id as nvidia-smi prints it, e.g. 00000000:3B:00.0."""
        return f"{self.domain:08X}:{self.bus:02X}:{self.device:02X}.0"


class CudaDevice(NamedTuple):
    index: int  # torch's index (after CUDA_VISIBLE_DEVICES)
    location: PciLocation
    holds_memory: bool  # torch has memory reserved there, so this process has a CUDA context on it


@dataclass(frozen=True)
class MemorySource:
    """What a sampler reads: ``read()`` returns MB of the kind ``kind``; ``cuda_index`` is the torch device whose
    allocator peak is recorded too (None on CPU)."""

    kind: str
    read: Callable[[], float]
    gpu_bus_id: str = ""
    cuda_index: int | None = None


def rss_source() -> MemorySource:
    process = psutil.Process(os.getpid())
    return MemorySource("rss", lambda: process.memory_info().rss / 2**20)


def torch_cuda_device(device: str) -> CudaDevice:
    """The CUDA device ``device`` ("cuda" = torch's current device, or "cuda:<i>") as torch sees it."""
    import torch

    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    location = PciLocation(properties.pci_domain_id, properties.pci_bus_id, properties.pci_device_id)
    return CudaDevice(index, location, torch.cuda.memory_reserved(index) > 0)


def find_nvml_handle(nvml: Any, location: PciLocation) -> Any:
    """NVML's handle of the GPU at ``location``; NVML's index of it may differ from torch's."""
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        pci = nvml.nvmlDeviceGetPciInfo(handle)
        if PciLocation(pci.domain, pci.bus, pci.device) == location:
            return handle
    raise LookupError(f"NVML lists no GPU at PCI bus id {location.bus_id}")


def process_memory_mb(processes: Sequence[Any], pid: int) -> float | None:
    """GPU memory NVML attributes to ``pid`` (MB), from nvmlDeviceGetComputeRunningProcesses; None when it lists no
    usable entry for it (not listed, or memory not available, as under some drivers)."""
    own = [process.usedGpuMemory for process in processes if process.pid == pid]
    if not own or any(memory is None for memory in own):
        return None
    return sum(own) / 2**20


def nvml_source(nvml: Any, location: PciLocation, pid: int, holds_memory: bool) -> MemorySource:
    """Sample process ``pid``'s memory on the GPU at ``location`` through the (initialised) NVML module ``nvml``.

    A process without a CUDA context there yet is not listed and reads 0 until it is. A process that holds memory
    there but is not listed is one NVML cannot see by its pid (a container's PID namespace): then the whole
    device's used memory is the best figure left, marked ``gpu_device`` and logged.
    """
    handle = find_nvml_handle(nvml, location)

    def own() -> float | None:
        return process_memory_mb(nvml.nvmlDeviceGetComputeRunningProcesses(handle), pid)

    if own() is not None or not holds_memory:
        return MemorySource("gpu", lambda: own() or 0.0, location.bus_id)
    log.warning("NVML lists no GPU memory of this process (pid %d) on GPU %s although it holds memory there (a "
                "container's PID namespace?): sampling the whole device's used memory, other processes included",
                pid, location.bus_id)
    return MemorySource("gpu_device", lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20, location.bus_id)


def memory_source(device: str) -> MemorySource:
    """The memory a sampler for ``device`` ("cpu", "cuda", "cuda:<i>") reads; every fallback is logged."""
    if device.split(":")[0] != "cuda":
        return rss_source()
    try:
        cuda = torch_cuda_device(device)
    except Exception as err:  # noqa: BLE001 - no usable CUDA device, whatever the reason
        log.warning("device %s requested but torch has no such CUDA device (%s: %s): sampling process RSS instead",
                    device, type(err).__name__, err)
        return rss_source()
    try:
        import pynvml

        pynvml.nvmlInit()
        source = nvml_source(pynvml, cuda.location, os.getpid(), cuda.holds_memory)
    except Exception as err:  # noqa: BLE001 - any NVML failure: no driver library, no permission, GPU not listed
        log.warning("NVML failed for GPU %s (%s: %s): MaxGPU_Mem is sampled as process RSS instead "
                    "(MaxTorch_Mem still holds PyTorch's GPU peak)", cuda.location.bus_id, type(err).__name__, err)
        source = rss_source()
    return replace(source, cuda_index=cuda.index)


class ResourceSampler:
    """Context manager sampling memory in a background thread; ``usage`` is set on exit.

    The area is integrated with the trapezoidal rule over the samples, including one at start and one at stop, so
    very short cases still get a sensible value.
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.source = memory_source(device)
        self.memory_kind = self.source.kind
        self.usage: Usage | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._samples.append((time.perf_counter(), self.source.read()))

    def __enter__(self) -> "ResourceSampler":
        if self.source.cuda_index is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(self.source.cuda_index)
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._samples = [(self._start, self.source.read())]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = time.perf_counter()
        samples = self._samples + [(end, self.source.read())]
        torch_peak = math.nan
        if self.source.cuda_index is not None:
            import torch

            torch_peak = torch.cuda.max_memory_allocated(self.source.cuda_index) / 2**20
        times = [t for t, _ in samples]
        mems = [m for _, m in samples]
        auc = sum((t1 - t0) * (m0 + m1) / 2 for t0, t1, m0, m1 in zip(times, times[1:], mems, mems[1:]))
        self.usage = Usage(end - self._start, max(mems), auc, self.source.kind, torch_peak, self.source.gpu_bus_id)


def measure_cases(cases: Sequence[str], run_case: Callable[[int], str], device: str,
                  interval_s: float = 0.1) -> pd.DataFrame:
    """Run ``run_case(i)`` (read, predict and write case ``i``; returns its image size ``XxYxZ``) for every case
    under a :class:`ResourceSampler` on ``device`` ("cpu", "cuda", "cuda:<i>"); one efficiency row per case,
    read -> write."""
    rows = []
    for index, case in enumerate(cases):
        with ResourceSampler(device, interval_s) as sampler:
            size = run_case(index)
        usage = sampler.usage
        rows.append([case, usage.time_s, usage.peak_mem_mb, usage.auc_mem_mb_s, size, usage.memory_kind,
                     usage.torch_peak_mb, usage.gpu_bus_id])
        torch_peak = "" if math.isnan(usage.torch_peak_mb) else f", torch peak {usage.torch_peak_mb:.0f} MB"
        print(f"{case}: {size} in {usage.time_s:.2f}s, peak {usage.memory_kind} {usage.peak_mem_mb:.0f} MB"
              f"{torch_peak}", flush=True)
    return pd.DataFrame(rows, columns=EFFICIENCY_COLUMNS)


def write_efficiency_table(path: str | os.PathLike, table: pd.DataFrame) -> None:
    """Atomically write an efficiency table (four decimals)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
