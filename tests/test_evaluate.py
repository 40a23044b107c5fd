"""Per-experiment evaluation (files in, FLARE table + summary out), the efficiency merge and the ablation table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.evaluation import ablation, efficiency_report, evaluate
from workflow_scripts.evaluation.metrics import case_metrics, class_specs
from workflow_scripts.io.volumes import CaseError, Geometry, write_volume

LABELS = [
    {"id": 1, "name": "Liver", "kind": "organ", "nsd_tolerance_mm": 5},
    {"id": 2, "name": "RK", "kind": "organ", "nsd_tolerance_mm": 3},
    {"id": 3, "name": "Lesion", "kind": "lesion", "nsd_tolerance_mm": 2},
]
GEOMETRY = Geometry(size=(20, 18, 12), spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def label_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.zeros(GEOMETRY.shape_zyx, np.uint8)
    gt[2:9, 3:12, 2:14] = 1
    gt[3:7, 13:17, 5:10] = 2
    gt[4:6, 5:8, 5:8] = 3
    pred = np.roll(gt, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 3)))
    pred[pred == 3] = 0 if seed % 2 else 3  # every other case misses the lesion
    return gt, pred


@pytest.fixture
def cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    paths = {}
    for k, case in enumerate(["c01", "c02", "c03"]):
        gt, pred = label_pair(k)
        gt_path, pred_path = tmp_path / "gt" / f"{case}.nii.gz", tmp_path / "pred" / f"{case}.nii.gz"
        write_volume(gt_path, gt, GEOMETRY)
        write_volume(pred_path, pred, GEOMETRY)
        paths[case] = (str(gt_path), str(pred_path))
    return paths


def test_metrics_table_has_flare_layout_and_values(cases):
    names = list(cases)
    table = evaluate.evaluate_experiment(names, [cases[c][0] for c in names], [cases[c][1] for c in names], LABELS)
    assert list(table.columns) == ["Name", "Liver_DSC", "RK_DSC", "Lesion_DSC", "Liver_NSD", "RK_NSD", "Lesion_NSD"]
    assert list(table["Name"]) == names
    for k, case in enumerate(names):
        gt, pred = label_pair(k)
        expected = case_metrics(gt, pred, GEOMETRY.spacing_zyx, class_specs(LABELS))
        row = table.iloc[k]
        for entry in LABELS:
            assert row[f"{entry['name']}_DSC"] == pytest.approx(expected[entry["id"]][0])
            assert row[f"{entry['name']}_NSD"] == pytest.approx(expected[entry["id"]][1])
    assert table.loc[1, "Lesion_DSC"] == 0.0  # a missed lesion scores 0


def test_parallel_jobs_give_the_same_table(cases):
    names = list(cases)
    args = (names, [cases[c][0] for c in names], [cases[c][1] for c in names], LABELS)
    pd.testing.assert_frame_equal(evaluate.evaluate_experiment(*args, jobs=2), evaluate.evaluate_experiment(*args))


def test_prediction_on_another_grid_is_an_error_naming_the_case(tmp_path, cases):
    gt, pred = label_pair(0)
    moved = Geometry(GEOMETRY.size, GEOMETRY.spacing, (5.0, 0.0, 0.0), GEOMETRY.direction)
    bad = tmp_path / "moved.nii.gz"
    write_volume(bad, pred, moved)
    with pytest.raises(CaseError, match=r"case 'c01'.*moved\.nii\.gz.*origin"):
        evaluate.evaluate_case("c01", cases["c01"][0], str(bad), class_specs(LABELS))


def test_missing_prediction_is_an_error_naming_the_case(tmp_path, cases):
    with pytest.raises(CaseError, match=r"case 'c02'.*does not exist"):
        evaluate.evaluate_case("c02", cases["c02"][0], str(tmp_path / "none.nii.gz"), class_specs(LABELS))


def test_summary_mean_std_and_organ_average():
    metrics = pd.DataFrame({"Name": ["a", "b"], "Liver_DSC": [0.9, 0.7], "RK_DSC": [0.5, 0.3],
                            "Lesion_DSC": [0.0, 1.0], "Liver_NSD": [1.0, 1.0], "RK_NSD": [0.4, 0.6],
                            "Lesion_NSD": [0.2, np.nan]})
    summary = evaluate.summary_table(metrics, LABELS).set_index("Target")
    assert list(summary.index) == ["Liver", "RK", "Lesion", "Organ average"]
    assert summary.loc["Liver", "DSC_mean"] == pytest.approx(0.8)
    assert summary.loc["Liver", "DSC_std"] == pytest.approx(0.1)  # population std
    assert summary.loc["Lesion", "NSD_mean"] == pytest.approx(0.2)  # NaN skipped
    # organ average: per-case organ means 0.7 and 0.5 -> 0.6 ± 0.1; the lesion is not an organ
    assert summary.loc["Organ average", "DSC_mean"] == pytest.approx(0.6)
    assert summary.loc["Organ average", "DSC_std"] == pytest.approx(0.1)
    assert summary.loc["Organ average", "DSC(%)"] == "60.00 ± 10.00"
    assert summary.loc["Organ average", "Kind"] == "average"


def test_cli_writes_metrics_and_summary(tmp_path, cases):
    names = list(cases)
    out_metrics, out_summary = tmp_path / "eval" / "metrics.tsv", tmp_path / "eval" / "summary.tsv"
    evaluate.main(["--cases", *names, "--gt", *[cases[c][0] for c in names], "--pred", *[cases[c][1] for c in names],
                   "--label-map", json.dumps(LABELS), "--z-crop-classes", "--nsd-zero-below-dsc", "none",
                   "--metrics", str(out_metrics), "--summary", str(out_summary)])
    metrics = pd.read_csv(out_metrics, sep="\t")
    summary = pd.read_csv(out_summary, sep="\t")
    assert list(metrics["Name"]) == names
    assert summary["Target"].tolist()[-1] == "Organ average"
    assert summary.loc[0, "DSC_mean"] == pytest.approx(metrics["Liver_DSC"].mean(), abs=1e-6)


def test_cli_scores_labelled_cases_and_names_the_unscored(tmp_path, cases, capsys):
    """Test images without a label are predicted, not scored: the tables cover the scored cases and say which were
    left out, and so does the log."""
    scored = ["c01", "c03"]
    out_metrics, out_summary = tmp_path / "eval" / "metrics.tsv", tmp_path / "eval" / "summary.tsv"
    evaluate.main(["--cases", *scored, "--unscored", "c02", "x04", "--gt", *[cases[c][0] for c in scored],
                   "--pred", *[cases[c][1] for c in scored], "--label-map", json.dumps(LABELS),
                   "--metrics", str(out_metrics), "--summary", str(out_summary)])
    assert list(pd.read_csv(out_metrics, sep="\t")["Name"]) == scored
    summary = pd.read_csv(out_summary, sep="\t")
    assert (summary["Scored_cases"] == 2).all() and (summary["Unscored_cases"] == "c02,x04").all()
    assert "scored 2 of 4 test cases; not scored (no label): 2: c02, x04" in capsys.readouterr().out
    # with every case labelled the log line says just that
    assert evaluate.coverage_line(scored, []) == "scored 2 of 2 test cases"
    with pytest.raises(SystemExit):
        evaluate.main(["--cases", "c01", "--unscored", "c01", "--gt", cases["c01"][0], "--pred", cases["c01"][1],
                       "--label-map", json.dumps(LABELS), "--metrics", str(out_metrics), "--summary",
                       str(out_summary)])


def write_shard(path: Path, rows: list[tuple]) -> str:
    frame = pd.DataFrame(rows, columns=efficiency_report.COLUMNS[:len(rows[0])])
    frame.to_csv(path, sep="\t", index=False)
    return str(path)


def test_efficiency_shards_are_merged_sorted(tmp_path):
    a = write_shard(tmp_path / "0000.tsv", [("c02", 2.0, 900.0, 1500.0, "64x64x40", "gpu", 700.0, "00000000:3B:00.0")])
    b = write_shard(tmp_path / "0001.tsv", [("c01", 1.5, 800.0, 1000.0, "64x64x36", "gpu", 650.0, "00000000:3B:00.0"),
                                             ("c03", 2.5, 950.0, 2100.0, "64x64x44", "gpu", 720.0, "00000000:3B:00.0")])
    table = efficiency_report.merge_shard_tables([a, b], ["c01", "c02", "c03"])
    assert list(table["Name"]) == ["c01", "c02", "c03"]
    assert list(table.columns) == efficiency_report.COLUMNS
    assert table.loc[1, "ImageSize"] == "64x64x40"
    assert table["MaxTorch_Mem"].tolist() == [650.0, 700.0, 720.0]
    assert set(table["GPU_BusId"]) == {"00000000:3B:00.0"}


def test_efficiency_tables_without_gpu_columns_are_still_merged(tmp_path):
    """A shard written before MaxTorch_Mem and GPU_BusId existed (or on CPU, where they are empty) still merges."""
    old = write_shard(tmp_path / "0000.tsv", [("c01", 1.5, 800.0, 1000.0, "64x64x36", "rss")])
    table = efficiency_report.merge_shard_tables([old], ["c01"])
    assert list(table.columns) == efficiency_report.COLUMNS
    assert table[["MaxTorch_Mem", "GPU_BusId"]].isna().all().all()


def test_efficiency_merge_rejects_bad_shards(tmp_path):
    a = write_shard(tmp_path / "0000.tsv", [("c01", 2.0, 900.0, 1500.0, "64x64x40", "gpu")])
    with pytest.raises(ValueError, match="more than once"):
        efficiency_report.merge_shard_tables([a, a])
    with pytest.raises(ValueError, match=r"c02"):
        efficiency_report.merge_shard_tables([a], ["c01", "c02"])
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"Name": ["c01"], "Time": [1.0]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="bad.tsv lacks columns"):
        efficiency_report.merge_shard_tables([str(bad)])


def summary_of(values: list[float]) -> pd.DataFrame:
    metrics = pd.DataFrame({"Name": ["a"], **{f"{e['name']}_{m}": [v] for e, v in zip(LABELS, values)
                                                for m in ("DSC", "NSD")}})
    return evaluate.summary_table(metrics, LABELS)


def test_ablation_puts_experiments_side_by_side():
    table = ablation.ablation_table(["baseline", "teacher"], [summary_of([0.5, 0.1, 0.2]), summary_of([0.9, 0.8, 0.0])])
    assert list(table.columns) == ["Target", "baseline_DSC", "baseline_NSD", "teacher_DSC", "teacher_NSD"]
    assert list(table["Target"]) == ["Liver", "RK", "Lesion", "Organ average"]
    assert table.loc[3, "baseline_DSC"] == pytest.approx(0.3)
    assert table.loc[2, "teacher_NSD"] == 0.0


def test_ablation_rejects_mismatched_summaries():
    other = summary_of([0.5, 0.1, 0.2]).iloc[:2]
    with pytest.raises(ValueError, match="targets"):
        ablation.ablation_table(["a", "b"], [summary_of([0.5, 0.1, 0.2]), other])
