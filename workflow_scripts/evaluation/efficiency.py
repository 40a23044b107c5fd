"""Resource sampling for inference runs, the FLARE way.

FLARE ranks efficiency by wall time, peak GPU memory and the area under the GPU-memory-time curve, sampled every
0.1 s. :class:`ResourceSampler` records those around one case; on a machine without a GPU (or with
device=cpu) it samples the process's resident memory instead and says so in ``memory_kind``.
:func:`measure_cases` runs a prediction shard's cases under it and returns the per-case efficiency table
(:data:`EFFICIENCY_COLUMNS`, the paper's Table 6) that every prediction job writes with
:func:`write_efficiency_table` and :mod:`workflow_scripts.evaluation.efficiency_report` collects.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import psutil

from ..io.volumes import atomic_path

# one row per case: case id, seconds, peak memory (MB), memory-time area (MB*s), size XxYxZ, "gpu" or "rss"
EFFICIENCY_COLUMNS = ["Name", "Time", "MaxGPU_Mem", "AUC_GPU_Time", "ImageSize", "MemoryKind"]


@dataclass(frozen=True)
class Usage:
    time_s: float
    peak_mem_mb: float
    auc_mem_mb_s: float
    memory_kind: str  # "gpu" (device memory used, NVML) or "rss" (process resident memory)


def _gpu_reader(device_index: int):
    """A function returning used GPU memory in MB via NVML, or None when NVML or a GPU is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        pynvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:  # noqa: BLE001 - any NVML failure means "no GPU to sample"
        return None
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


class ResourceSampler:
    """Context manager sampling memory in a background thread; ``usage`` is set on exit.

    The area is integrated with the trapezoidal rule over the samples, including one at start and one at stop, so
    very short cases still get a sensible value.
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.1, device_index: int = 0) -> None:
        self.interval_s = interval_s
        reader = _gpu_reader(device_index) if device == "cuda" else None
        if reader is not None:
            self.memory_kind, self._read = "gpu", reader
        else:
            process = psutil.Process(os.getpid())
            self.memory_kind, self._read = "rss", lambda: process.memory_info().rss / 2**20
        self.usage: Usage | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._samples.append((time.perf_counter(), self._read()))

    def __enter__(self) -> "ResourceSampler":
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._samples = [(self._start, self._read())]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = time.perf_counter()
        samples = self._samples + [(end, self._read())]
        times = [t for t, _ in samples]
        mems = [m for _, m in samples]
        auc = sum((t1 - t0) * (m0 + m1) / 2 for t0, t1, m0, m1 in zip(times, times[1:], mems, mems[1:]))
        self.usage = Usage(end - self._start, max(mems), auc, self.memory_kind)


def measure_cases(cases: Sequence[str], run_case: Callable[[int], str], device: str,
                  interval_s: float = 0.1) -> pd.DataFrame:
    """Run ``run_case(i)`` (read, predict and write case ``i``; returns its image size ``XxYxZ``) for every case
    under a :class:`ResourceSampler`; one efficiency row per case, read -> write."""
    rows = []
    for index, case in enumerate(cases):
        with ResourceSampler(device, interval_s) as sampler:
            size = run_case(index)
        usage = sampler.usage
        rows.append([case, usage.time_s, usage.peak_mem_mb, usage.auc_mem_mb_s, size, usage.memory_kind])
        print(f"{case}: {size} in {usage.time_s:.2f}s, peak {usage.memory_kind} {usage.peak_mem_mb:.0f} MB",
              flush=True)
    return pd.DataFrame(rows, columns=EFFICIENCY_COLUMNS)


def write_efficiency_table(path: str | os.PathLike, table: pd.DataFrame) -> None:
    """Atomically write an efficiency table (four decimals)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
