"""Scoring of pseudo-labels and merged labels against the complete truth (annotated / filled / missing)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.evaluation import label_quality as lq
from workflow_scripts.io.volumes import Geometry, write_volume

LABELS = [{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 2, "name": "Spleen", "kind": "organ"},
          {"id": 3, "name": "Kidney", "kind": "organ"}, {"id": 4, "name": "Lesion", "kind": "lesion"}]
GEOMETRY = Geometry((8, 6, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def truth_volume() -> np.ndarray:
    truth = np.zeros((4, 6, 8), np.uint8)
    truth[:, :3, :4] = 1
    truth[:, 3:, 4:] = 2
    truth[0, 0, 0] = 4
    return truth


def test_sources_say_where_each_class_of_a_merged_label_comes_from() -> None:
    truth = truth_volume()
    merged = truth.copy()
    merged[merged == 4] = 1  # the lesion was not annotated and the teacher does not predict it
    merged[:, 3:, 4:6] = 0  # the filled spleen is half right
    rows = lq.score_label("c", truth, merged, LABELS, annotated=[1])
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == {"Liver", "Spleen", "Lesion"}  # the kidney is in neither: no row
    assert by_name["Liver"]["source"] == "annotated"
    assert by_name["Spleen"]["source"] == "filled"
    assert by_name["Spleen"]["dsc"] == pytest.approx(2 * 12 / (24 + 12))
    assert by_name["Lesion"]["source"] == "missing" and by_name["Lesion"]["dsc"] == 0.0


def test_pseudo_labels_are_scored_per_class_and_summarised(tmp_path) -> None:
    truth = truth_volume()
    pseudo = np.where(truth == 4, 1, truth).astype(np.uint8)
    write_volume(tmp_path / "t.nii.gz", truth, GEOMETRY)
    write_volume(tmp_path / "p.nii.gz", pseudo, GEOMETRY)
    table = lq.score_cases(["c"], [str(tmp_path / "t.nii.gz")], [str(tmp_path / "p.nii.gz")], LABELS[:3], None)
    assert list(table.columns) == lq.COLUMNS
    assert table["source"].eq("pseudo").all() and table["dsc"].tolist() == pytest.approx([2 * 47 / 95, 1.0])
    summary = lq.summary(table)
    assert summary["name"].tolist() == ["Liver", "Spleen"] and summary["cases"].tolist() == [1, 1]


def test_cli_reads_annotated_classes_from_the_split_and_names_a_mismatched_case(tmp_path) -> None:
    truth = truth_volume()
    write_volume(tmp_path / "t.nii.gz", truth, GEOMETRY)
    write_volume(tmp_path / "m.nii.gz", truth, GEOMETRY)
    pd.DataFrame({"case": ["c"], "category": ["weak"], "classes": ["1,4"]}).to_csv(tmp_path / "split.tsv", sep="\t",
                                                                                   index=False)
    import json
    lq.main(["--cases", "c", "--truth", str(tmp_path / "t.nii.gz"), "--labels", str(tmp_path / "m.nii.gz"),
             "--split", str(tmp_path / "split.tsv"), "--label-map", json.dumps(LABELS), "--output",
             str(tmp_path / "out.tsv")])
    table = pd.read_csv(tmp_path / "out.tsv", sep="\t")
    assert dict(zip(table["name"], table["source"])) == {"Liver": "annotated", "Spleen": "filled",
                                                         "Lesion": "annotated"}
    other = Geometry((8, 6, 4), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(tmp_path / "bad.nii.gz", truth, other)
    with pytest.raises(SystemExit, match=r"'c'.*bad\.nii\.gz"):
        lq.main(["--cases", "c", "--truth", str(tmp_path / "t.nii.gz"), "--labels", str(tmp_path / "bad.nii.gz"),
                 "--label-map", json.dumps(LABELS), "--output", str(tmp_path / "bad.tsv")])
    assert not (tmp_path / "bad.tsv").exists()
