"""One efficiency table per experiment from the per-shard tables the prediction jobs write.

Prediction jobs run on shards of test cases (the model is loaded once per shard) and each writes the FLARE
efficiency measurements of its cases: wall time (s), peak memory (MB) and the area under the memory-time curve
(MB·s), sampled with :class:`workflow_scripts.evaluation.efficiency.ResourceSampler`. ``MemoryKind`` says whether
memory is the process's GPU memory (NVML), the whole GPU's, or, on CPU-only runs, the process's resident memory, so a
CPU table is never mistaken for a GPU one; ``MaxTorch_Mem`` and ``GPU_BusId`` give PyTorch's own peak and the GPU.
This module concatenates the shards into the paper's Table 6 layout and checks that every test case appears once.
Shard tables written before the GPU columns existed are still read (those columns stay empty).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import pandas as pd

from ..io.volumes import write_text
from .efficiency import EFFICIENCY_COLUMNS as COLUMNS
from .efficiency import TABLE6_COLUMNS


def merge_shard_tables(paths: Sequence[str], expected_cases: Sequence[str] | None = None) -> pd.DataFrame:
    """Concatenate shard tables (sorted by case), failing on missing Table 6 columns, duplicates or missing cases;
    GPU detail columns a table lacks (written by an older version) are left empty."""
    frames = []
    for path in paths:
        frame = pd.read_csv(path, sep="\t", dtype={"Name": str, "ImageSize": str, "MemoryKind": str, "GPU_BusId": str})
        missing = [c for c in TABLE6_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"efficiency table {path} lacks columns {missing} (expected {COLUMNS})")
        frames.append(frame.reindex(columns=COLUMNS))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    duplicated = sorted(set(table.loc[table["Name"].duplicated(), "Name"]))
    if duplicated:
        raise ValueError(f"cases measured more than once across {len(paths)} shard tables: {duplicated}")
    if expected_cases is not None:
        absent = sorted(set(expected_cases) - set(table["Name"]))
        if absent:
            raise ValueError(f"no efficiency measurement for cases {absent} in {list(paths)}")
    return table.sort_values("Name", ignore_index=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge per-shard efficiency tables of one experiment.")
    parser.add_argument("--tables", nargs="+", required=True)
    parser.add_argument("--cases", nargs="*", help="test cases that must all appear")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    table = merge_shard_tables(args.tables, args.cases)
    write_text(args.output, table.to_csv(sep="\t", index=False, float_format="%.4f"))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
