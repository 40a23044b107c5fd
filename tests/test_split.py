"""Split: strong / weak / unlabeled by the classes each accepted case annotates."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from workflow_scripts.ingest import split

ORGANS = list(range(1, 14))
LABEL_MAP = json.dumps([{"id": i, "name": f"C{i}", "kind": "lesion" if i == 14 else "organ"} for i in range(1, 15)])


@pytest.mark.parametrize("classes, category", [
    (ORGANS, "strong"),
    (ORGANS + [14], "strong"),  # the lesion is not required
    (ORGANS[:-1] + [14], "weak"),
    ([14], "weak"),
    ([1, 3, 5], "weak"),
    ([], "unlabeled"),
])
def test_categorize(classes, category) -> None:
    assert split.categorize(classes, ORGANS) == category


def test_categorize_with_custom_requirement() -> None:
    assert split.categorize([1, 14], [1, 14]) == "strong"
    assert split.categorize([1], [1, 14]) == "weak"


def test_split_keeps_accepted_order_and_marks_cases_without_classes_unlabeled() -> None:
    table = split.split_cases(["c", "a", "b", "z"], {"a": ORGANS, "b": [14], "c": [3, 1]}, ORGANS)
    assert table.to_dict("records") == [
        {"case": "c", "category": "weak", "classes": "1,3"},
        {"case": "a", "category": "strong", "classes": ",".join(map(str, ORGANS))},
        {"case": "b", "category": "weak", "classes": "14"},
        {"case": "z", "category": "unlabeled", "classes": ""},
    ]


def test_no_strong_case_is_an_error() -> None:
    with pytest.raises(split.SplitError, match=r"no strong case among 2 accepted case\(s\).*split.strong_requires"):
        split.split_cases(["a", "b"], {"a": [14], "b": ORGANS[:5]}, ORGANS)


def write_inputs(tmp_path: Path, stats_rows, accepted) -> tuple[Path, Path]:
    accepted_tsv, stats_tsv = tmp_path / "accepted.tsv", tmp_path / "label_stats.tsv"
    pd.DataFrame({"case": accepted, "has_label": True}).to_csv(accepted_tsv, sep="\t", index=False)
    pd.DataFrame(stats_rows, columns=["case", "class_id", "voxels"]).to_csv(stats_tsv, sep="\t", index=False)
    return accepted_tsv, stats_tsv


def run_cli(tmp_path: Path, accepted_tsv: Path, stats_tsv: Path, requires=ORGANS) -> tuple[int, Path]:
    output = tmp_path / "split" / "split.tsv"
    code = split.main(["--accepted", str(accepted_tsv), "--label-stats", str(stats_tsv), "--strong-requires",
                       *map(str, requires), "--label-map", LABEL_MAP, "--output", str(output)])
    return code, output


def test_cli_reads_label_stats_and_prints_counts(tmp_path: Path, capsys) -> None:
    rows = [("s1", c, 10) for c in ORGANS] + [("w1", 14, 3), ("w2", 2, 5)]
    code, output = run_cli(tmp_path, *write_inputs(tmp_path, rows, ["s1", "u1", "w1", "w2"]))
    assert code == 0
    table = pd.read_csv(output, sep="\t", dtype=str, keep_default_na=False)
    assert list(table["case"]) == ["s1", "u1", "w1", "w2"]
    assert list(table["category"]) == ["strong", "unlabeled", "weak", "weak"]
    assert "split: 1 strong, 2 weak, 1 unlabeled" in capsys.readouterr().out


def test_cli_fails_without_strong_case_and_writes_nothing(tmp_path: Path, capsys) -> None:
    code, output = run_cli(tmp_path, *write_inputs(tmp_path, [("w1", 14, 3)], ["w1", "u1"]))
    assert code == 1 and not output.exists()
    assert "teacher cannot be trained" in capsys.readouterr().err


def test_cli_rejects_required_classes_outside_the_label_map(tmp_path: Path, capsys) -> None:
    code, output = run_cli(tmp_path, *write_inputs(tmp_path, [], ["a"]), requires=[1, 99])
    assert code == 1 and not output.exists()
    assert "[99]" in capsys.readouterr().err
