"""The resource sampler measures time, peak memory and the memory-time area."""
from __future__ import annotations

import time

import numpy as np

from workflow_scripts.evaluation.efficiency import ResourceSampler


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
    del block


def test_cuda_request_without_gpu_falls_back_to_rss() -> None:
    with ResourceSampler("cuda", interval_s=0.05) as sampler:
        pass
    assert sampler.usage.memory_kind in {"gpu", "rss"}
    assert sampler.usage.time_s >= 0
