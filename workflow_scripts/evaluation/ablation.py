"""The ablation table (the paper's Table 4): mean DSC and NSD per class for several experiments side by side.

Built from each experiment's ``summary.tsv`` so the numbers are exactly those of the per-experiment summaries:
one row per class and the organ average, columns ``<experiment>_DSC`` / ``<experiment>_NSD``.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import pandas as pd

from ..io.volumes import write_text


def ablation_table(experiments: Sequence[str], summaries: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Join the summaries' mean columns on Target, in the first summary's row order."""
    if len(experiments) != len(summaries):
        raise ValueError(f"{len(experiments)} experiments but {len(summaries)} summaries")
    table = summaries[0][["Target"]].copy()
    for name, summary in zip(experiments, summaries):
        if list(summary["Target"]) != list(table["Target"]):
            raise ValueError(f"summary of {name!r} has targets {list(summary['Target'])}, expected {list(table['Target'])}")
        table[f"{name}_DSC"] = summary["DSC_mean"].to_numpy()
        table[f"{name}_NSD"] = summary["NSD_mean"].to_numpy()
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ablation table from per-experiment summaries.")
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--summaries", nargs="+", required=True, help="summary.tsv files, in --experiments order")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    table = ablation_table(args.experiments, [pd.read_csv(p, sep="\t") for p in args.summaries])
    write_text(args.output, table.to_csv(sep="\t", index=False, float_format="%.4f"))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
