"""The resource sampler measures time, peak memory and the memory-time area; on CUDA it samples this process's
memory on the GPU it computes on (found by PCI bus id, not NVML's index), tested with a fake NVML module."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from workflow_scripts.evaluation import efficiency
from workflow_scripts.evaluation.efficiency import (
    EFFICIENCY_COLUMNS,
    CudaDevice,
    PciLocation,
    ResourceSampler,
    measure_cases,
    nvml_source,
)

MB = 2**20
PID = os.getpid()
OTHER_PID = PID + 1


def test_cpu_sampling_reports_rss_and_consistent_area() -> None:
    with ResourceSampler("cpu", interval_s=0.02) as sampler:
        block = np.ones(20 * 2**20 // 8)  # 20 MB, touched
        time.sleep(0.2)
    usage = sampler.usage
    assert usage.memory_kind == "rss"
    assert usage.time_s >= 0.2
    assert usage.peak_mem_mb > 20
    # the area lies between (min memory x time) and (peak x time)
    assert 0 < usage.auc_mem_mb_s <= usage.peak_mem_mb * usage.time_s + 1e-9
    assert math.isnan(usage.torch_peak_mb) and usage.gpu_bus_id == ""
    del block


def test_cuda_request_without_gpu_falls_back_to_rss() -> None:
    with ResourceSampler("cuda", interval_s=0.05) as sampler:
        pass
    assert sampler.usage.memory_kind in {"gpu", "rss"}
    assert sampler.usage.time_s >= 0


class FakeNVML(types.ModuleType):
    """The part of pynvml the sampler uses, over a list of GPUs in NVML's order.

    Each GPU: its PCI location, the card's used memory and the compute processes (pid -> bytes) on it. Tests change
    ``gpus`` while a sampler runs to play a process's memory growing.
    """

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[dict], init_error: str | None = None) -> None:
        super().__init__("pynvml")
        self.gpus, self.init_error = gpus, init_error

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetPciInfo(self, handle: int) -> SimpleNamespace:
        location = self.gpus[handle]["pci"]
        return SimpleNamespace(domain=location.domain, bus=location.bus, device=location.device,
                               busId=location.bus_id.encode())

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.gpus[handle]["used"], total=141 * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        processes = self.gpus[handle]["processes"]
        return [SimpleNamespace(pid=pid, usedGpuMemory=memory) for pid, memory in processes.items()]


BUS = [PciLocation(0, 0x1B, 0), PciLocation(0, 0x3B, 0), PciLocation(0, 0x86, 0)]


def three_gpus(own_on_third: int | None) -> list[dict]:
    """NVML's GPU 0 is busy with another job; this process computes on NVML's GPU 2, next to another job."""
    third = {OTHER_PID: 9000 * MB} | ({PID: own_on_third} if own_on_third is not None else {})
    return [{"pci": BUS[0], "used": 20000 * MB, "processes": {OTHER_PID + 1: 20000 * MB}},
            {"pci": BUS[1], "used": 0, "processes": {}},
            {"pci": BUS[2], "used": 9500 * MB + (own_on_third or 0), "processes": third}]


def test_the_gpu_is_found_by_bus_id_and_only_this_process_counts() -> None:
    nvml = FakeNVML(three_gpus(own_on_third=1500 * MB))
    source = nvml_source(nvml, BUS[2], PID, holds_memory=True)
    assert (source.kind, source.gpu_bus_id) == ("gpu", "00000000:86:00.0")
    assert source.read() == pytest.approx(1500)  # not GPU 0's 20000 MB, nor the 9000 MB of the other job beside it


def test_a_process_without_a_context_yet_reads_zero_until_it_has_one() -> None:
    nvml = FakeNVML(three_gpus(own_on_third=None))
    source = nvml_source(nvml, BUS[2], PID, holds_memory=False)
    assert (source.kind, source.read()) == ("gpu", 0.0)
    nvml.gpus[2]["processes"][PID] = 700 * MB
    assert source.read() == pytest.approx(700)


def test_an_unlisted_process_holding_memory_falls_back_to_the_device_and_says_so(caplog) -> None:
    nvml = FakeNVML(three_gpus(own_on_third=None))  # e.g. a container: NVML lists host pids
    with caplog.at_level(logging.WARNING, logger=efficiency.__name__):
        source = nvml_source(nvml, BUS[2], PID, holds_memory=True)
    assert (source.kind, source.read()) == ("gpu_device", pytest.approx(9500))
    assert "PID namespace" in caplog.text and "00000000:86:00.0" in caplog.text


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch computes on its cuda:0, which NVML lists third; torch's allocator peak is 1234 MB."""
    monkeypatch.setattr(efficiency, "torch_cuda_device", lambda device: CudaDevice(0, BUS[2], True))
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda index: resets.append(index))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda index: 1234 * MB)
    return resets


def test_sampler_records_the_process_peak_on_its_gpu_and_torch_peak(monkeypatch, fake_cuda) -> None:
    nvml = FakeNVML(three_gpus(own_on_third=1500 * MB))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    def run_case(index: int) -> str:
        nvml.gpus[2]["processes"][PID] = 2500 * MB  # this process grows ...
        nvml.gpus[2]["processes"][OTHER_PID] = 30000 * MB  # ... and so does the other job on the same GPU
        time.sleep(0.1)
        return "512x512x300"

    table = measure_cases(["case1"], run_case, "cuda", interval_s=0.01)
    assert list(table.columns) == EFFICIENCY_COLUMNS
    row = table.iloc[0]
    assert row["MemoryKind"] == "gpu" and row["GPU_BusId"] == "00000000:86:00.0"
    assert row["MaxGPU_Mem"] == pytest.approx(2500)
    assert row["MaxTorch_Mem"] == pytest.approx(1234)
    assert fake_cuda == [0]  # torch's peak was reset on the sampled device before the case


@pytest.mark.parametrize("nvml, cause", [
    (FakeNVML([], init_error="Driver Not Loaded"), "Driver Not Loaded"),
    (FakeNVML(three_gpus(1500 * MB)[:2]), "no GPU at PCI bus id 00000000:86:00.0"),
])
def test_nvml_failure_is_logged_and_falls_back_to_rss(monkeypatch, fake_cuda, caplog, nvml, cause) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with caplog.at_level(logging.WARNING, logger=efficiency.__name__):
        with ResourceSampler("cuda", interval_s=0.01) as sampler:
            pass
    assert sampler.usage.memory_kind == "rss" and sampler.usage.torch_peak_mb == pytest.approx(1234)
    assert "NVML failed" in caplog.text and cause in caplog.text
