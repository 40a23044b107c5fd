"""Split accepted training cases into strong, weak and unlabeled by what their labels annotate.

The paper trains its teacher only on *strong* cases (every organ annotated): a weak label marks missing organs as
background, and mixing such conflicting supervision makes the teacher degrade. Weak cases are supplemented with the
teacher's pseudo-labels later; unlabeled cases (no label file, or a label without any class) optionally too.
"""
from __future__ import annotations

import argparse
import sys
from typing import Collection, Mapping, Sequence

import pandas as pd

from ..io.label_map import add_label_map_argument, label_classes
from ..io.volumes import write_text

CATEGORIES = ("strong", "weak", "unlabeled")


class SplitError(Exception):
    """The split cannot feed the workflow (e.g. no strong case for the teacher)."""


def categorize(classes: Collection[int], strong_requires: Collection[int]) -> str:
    """Category of a case annotating ``classes``: strong when it covers every required class."""
    if not classes:
        return "unlabeled"
    return "strong" if set(strong_requires) <= set(classes) else "weak"


def split_cases(accepted: Sequence[str], classes_by_case: Mapping[str, Collection[int]],
                strong_requires: Collection[int]) -> pd.DataFrame:
    """Table of case, category and classes (comma-separated ids) for the accepted cases, in the given order.

    Cases absent from ``classes_by_case`` have no annotated class and are unlabeled. Raises :class:`SplitError`
    when no case is strong, because the teacher would have nothing to train on.
    """
    rows = []
    for case in accepted:
        classes = sorted(classes_by_case.get(case, ()))
        rows.append((case, categorize(classes, strong_requires), ",".join(map(str, classes))))
    table = pd.DataFrame(rows, columns=["case", "category", "classes"])
    if not (table["category"] == "strong").any():
        raise SplitError(
            f"no strong case among {len(table)} accepted case(s): none annotates all of the classes "
            f"{sorted(strong_requires)} (split.strong_requires), so the teacher cannot be trained"
        )
    return table


def _run(args: argparse.Namespace) -> int:
    label_map = label_classes(args.label_map)
    unknown = sorted(set(args.strong_requires) - set(label_map))
    if unknown:
        raise SplitError(f"split.strong_requires names classes {unknown} that are not in the label map")
    accepted = pd.read_csv(args.accepted, sep="\t")
    stats = pd.read_csv(args.label_stats, sep="\t")
    classes_by_case = stats[stats["voxels"] > 0].groupby("case")["class_id"].apply(list).to_dict()
    table = split_cases(list(accepted["case"]), classes_by_case, args.strong_requires)
    counts = table["category"].value_counts().reindex(CATEGORIES, fill_value=0)
    print("split: " + ", ".join(f"{count} {category}" for category, count in counts.items()))
    write_text(args.output, table.to_csv(sep="\t", index=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accepted", required=True, help="accepted.tsv of QC (column case)")
    parser.add_argument("--label-stats", required=True, help="label_stats.tsv (columns case, class_id, voxels)")
    parser.add_argument("--strong-requires", nargs="+", type=int, required=True)
    add_label_map_argument(parser)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SplitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
