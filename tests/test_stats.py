"""Label statistics agree with an independent computation (numpy counts, scipy component labelling)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from workflow_scripts.ingest import stats
from workflow_scripts.io.label_map import label_classes
from workflow_scripts.io.volumes import CaseError

LABEL_MAP = [{"id": i, "name": f"C{i}", "kind": "lesion" if i == 14 else "organ"} for i in range(1, 15)]
CLASSES = label_classes(LABEL_MAP)
STRUCTURES = {6: ndimage.generate_binary_structure(3, 1), 18: ndimage.generate_binary_structure(3, 2),
              26: np.ones((3, 3, 3), bool)}


def reference(label: np.ndarray, voxel_mm3: float, connectivity: int) -> dict[int, tuple]:
    """Per class: voxels, volume (mL), components and bounding box, computed the slow, obvious way."""
    out = {}
    for c in range(1, int(label.max()) + 1):
        mask = label == c
        if not mask.any():
            continue
        idx = np.nonzero(mask)
        box = tuple(int(i.min()) for i in idx) + tuple(int(i.max()) + 1 for i in idx)
        components = ndimage.label(mask, structure=STRUCTURES[connectivity])[1]
        out[c] = (int(mask.sum()), mask.sum() * voxel_mm3 / 1000, components, box)
    return out


def as_dict(table: pd.DataFrame) -> dict[int, tuple]:
    return {
        int(r.class_id): (int(r.voxels), r.volume_ml, int(r.components),
                          (r.bbox_z0, r.bbox_y0, r.bbox_x0, r.bbox_z1, r.bbox_y1, r.bbox_x1))
        for r in table.itertuples()
    }


def assert_matches(table: pd.DataFrame, label: np.ndarray, voxel_mm3: float, connectivity: int) -> None:
    got, want = as_dict(table), reference(label, voxel_mm3, connectivity)
    assert got.keys() == want.keys()
    for c in want:
        assert got[c][0] == want[c][0] and got[c][2:] == want[c][2:], (c, got[c], want[c])
        assert got[c][1] == pytest.approx(want[c][1])


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_components_of_a_mask_one_voxel_thick_in_two_axes(connectivity: int) -> None:
    """Found by hypothesis: cc3d raised on such boolean masks with 26-connectivity; two separate voxels here."""
    label = np.zeros((3, 4, 6), dtype=np.uint8)
    label[0, 0, 0] = label[2, 0, 0] = 1
    assert_matches(stats.class_statistics(label, 2.5, CLASSES, connectivity), label, 2.5, connectivity)


@settings(max_examples=60, deadline=None)
@given(
    label=arrays(np.uint8, st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(1, 9)),
                 elements=st.sampled_from([0, 0, 0, 1, 2, 5, 14])),
    connectivity=st.sampled_from([6, 18, 26]),
)
def test_statistics_equal_independent_computation(label: np.ndarray, connectivity: int) -> None:
    table = stats.class_statistics(label, 2.5, CLASSES, connectivity)
    assert_matches(table, label, 2.5, connectivity)
    assert list(table.columns) == stats.CASE_COLUMNS[1:]


def test_realistic_label_with_several_components() -> None:
    rng = np.random.default_rng(3)
    label = np.zeros((30, 60, 70), np.uint8)
    label[5:20, 10:40, 10:30] = 1  # an organ
    label[8:12, 45:50, 40:60] = 3
    label[25:28, 50:55, 60:65] = 3  # a second, separate spleen piece
    label[rng.random(label.shape) < 0.002] = 14  # scattered lesion voxels: many components
    label[0, 0, 0] = 14  # at the volume's corner (bounding box starts at 0)
    for connectivity in (6, 26):
        table = stats.class_statistics(label, 0.8 * 0.8 * 2.5, CLASSES, connectivity)
        assert_matches(table, label, 0.8 * 0.8 * 2.5, connectivity)
    assert as_dict(table)[3][2] == 2 and as_dict(table)[1][3] == (5, 10, 10, 20, 40, 30)


def test_empty_label_has_no_rows() -> None:
    assert stats.class_statistics(np.zeros((4, 5, 6), np.uint8), 1.0, CLASSES).empty


def write_label(path: Path, label: np.ndarray, spacing=(0.5, 0.5, 2.0)) -> Path:
    image = sitk.GetImageFromArray(label)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_qc(path: Path, status: str = "ok", reasons=()) -> Path:
    path.write_text(json.dumps({"case": path.stem, "status": status, "reasons": list(reasons)}))
    return path


def test_case_cli_writes_table_with_volume_from_spacing(tmp_path: Path) -> None:
    label = np.zeros((6, 8, 8), np.int16)
    label[1:3, 2:6, 2:4] = 2
    label[5, 7, 7] = 13
    write_label(tmp_path / "c1.nii.gz", label)
    output = tmp_path / "cases" / "c1.tsv"
    args = ["case", "--case", "c1", "--label", str(tmp_path / "c1.nii.gz"), "--qc", str(write_qc(tmp_path / "c1.json")),
            "--label-map", json.dumps(LABEL_MAP), "--connectivity", "26", "--output", str(output)]
    assert stats.main(args) == 0
    table = pd.read_csv(output, sep="\t")
    assert list(table["case"]) == ["c1", "c1"] and list(table["name"]) == ["C2", "C13"]
    assert list(table["voxels"]) == [16, 1]
    assert table["volume_ml"].tolist() == pytest.approx([16 * 0.5 / 1000, 0.5 / 1000])
    assert table.iloc[1][["bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1"]].tolist() == [5, 7, 7, 6, 8, 8]


def test_case_cli_refuses_a_case_rejected_by_qc(tmp_path: Path, capsys) -> None:
    write_label(tmp_path / "c1.nii.gz", np.ones((2, 2, 2), np.uint8))
    qc_json = write_qc(tmp_path / "c1.json", "rejected", ["label values not in the label map"])
    output = tmp_path / "c1.tsv"
    args = ["case", "--case", "c1", "--label", str(tmp_path / "c1.nii.gz"), "--qc", str(qc_json),
            "--label-map", json.dumps(LABEL_MAP), "--connectivity", "26", "--output", str(output)]
    assert stats.main(args) == 1
    assert f"case 'c1' (file {qc_json}): QC rejected this case: label values" in capsys.readouterr().err
    assert not output.exists()


def test_case_statistics_refuses_negative_values(tmp_path: Path) -> None:
    path = write_label(tmp_path / "neg.nii.gz", np.full((2, 2, 2), -1, np.int16))
    with pytest.raises(CaseError, match="negative"):
        stats.case_statistics("neg", str(path), CLASSES)


def test_aggregate_tables_summary_histogram_and_figures(tmp_path: Path) -> None:
    tables = {}
    for case, classes in {"a": range(1, 14), "b": [14], "c": [14], "d": [], "e": [1, 14]}.items():
        label = np.zeros((3, 4, 30), np.uint8)
        for c in classes:
            label[1, 1, 2 * c] = c
        tables[case] = stats.class_statistics(label, 1.0, CLASSES).assign(case=case)
        stats.write_table(tmp_path / f"{case}.tsv", tables[case][stats.CASE_COLUMNS])
    long, summary, histogram = stats.aggregate(tables, CLASSES)
    assert len(long) == 13 + 1 + 1 + 0 + 2 and list(long["case"].unique()) == ["a", "b", "c", "e"]
    assert histogram.tolist() == [1, 2, 1] + [0] * 10 + [1, 0] and histogram.index.tolist() == list(range(15))
    by_id = summary.set_index("class_id")
    assert by_id.loc[14, "cases"] == 3 and by_id.loc[14, "fraction"] == pytest.approx(3 / 5)
    assert by_id.loc[2, "cases"] == 1 and by_id.loc[1, "cases"] == 2
    out = tmp_path / "out"
    args = ["aggregate", "--label-map", json.dumps(LABEL_MAP), "--table", str(out / "label_stats.tsv"),
            "--summary", str(out / "class_summary.tsv"), "--counts-png", str(out / "counts.png"),
            "--presence-png", str(out / "presence.png"), *(str(tmp_path / f"{c}.tsv") for c in tables)]
    assert stats.main(args) == 0
    assert pd.read_csv(out / "label_stats.tsv", sep="\t").shape == (17, len(stats.CASE_COLUMNS))
    for png in ("counts.png", "presence.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_without_labelled_cases_still_writes_tables_and_figures(tmp_path: Path) -> None:
    """With qc.on_error=skip every labelled case may be rejected; the split then reports the real problem."""
    args = ["aggregate", "--label-map", json.dumps(LABEL_MAP), "--table", str(tmp_path / "t.tsv"), "--summary",
            str(tmp_path / "s.tsv"), "--counts-png", str(tmp_path / "c.png"), "--presence-png", str(tmp_path / "p.png")]
    assert stats.main(args) == 0
    assert pd.read_csv(tmp_path / "t.tsv", sep="\t").empty
    assert pd.read_csv(tmp_path / "s.tsv", sep="\t")["cases"].tolist() == [0] * 14
