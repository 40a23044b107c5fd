"""QC: each kind of bad input is rejected with a message naming case and file, and nothing downstream is written."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import run_workflow
from workflow_scripts.ingest import qc
from workflow_scripts.io.label_map import LabelClass, label_classes, parse_label_map
from workflow_scripts.io.layout import discover_cases
from workflow_scripts.io.volumes import CaseError

SHAPE = (8, 16, 16)  # z, y, x
SPACING = (1.0, 1.0, 2.0)  # x, y, z
LABEL_IDS = list(range(1, 15))
LABEL_MAP = json.dumps([{"id": i, "name": f"C{i}", "kind": "lesion" if i == 14 else "organ"} for i in LABEL_IDS])


def write(path: Path, array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None,
          vector: bool = False) -> Path:
    """Write a small volume with the given geometry (SimpleITK, compressed when the name ends with .gz)."""
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[: image.GetDimension()])
    image.SetOrigin(origin[: image.GetDimension()])
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def good_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def block_label(classes) -> np.ndarray:
    """A label with one 2x3x3 block per class, at distinct positions."""
    label = np.zeros(SHAPE, np.uint8)
    for c in classes:
        z, y, x = 2 * ((c - 1) // 8), 4 * (((c - 1) // 4) % 2), 4 * ((c - 1) % 4)
        label[z : z + 2, y : y + 3, x : x + 3] = c
    return label


def paths(root: Path, case: str) -> tuple[Path, Path]:
    return root / "imagesTr" / f"{case}_0000.nii.gz", root / "labelsTr" / f"{case}.nii.gz"


def make_good(root: Path, case: str, classes=range(1, 15)) -> None:
    image, label = paths(root, case)
    write(image, good_image())
    if classes is not None:
        write(label, block_label(classes))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def bad_unreadable_image(root: Path, case: str) -> None:
    image, label = paths(root, case)
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(gzip.compress(b"this is not an image"))  # valid gzip, but no image format inside
    write(label, block_label([1]))


def bad_truncated_gzip(root: Path, case: str) -> None:
    make_good(root, case)
    _truncate(paths(root, case)[0])


def bad_2d_image(root: Path, case: str) -> None:
    write(paths(root, case)[0], good_image()[0])


def bad_4d_image(root: Path, case: str) -> None:
    volume = sitk.GetImageFromArray(good_image())
    image = paths(root, case)[0]
    image.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(image))


def bad_multichannel_image(root: Path, case: str) -> None:
    write(paths(root, case)[0], np.stack([good_image()] * 3, axis=-1), vector=True)


def bad_size(root: Path, case: str) -> None:
    image, label = paths(root, case)
    write(image, good_image())
    write(label, block_label([1])[:-1])


def bad_spacing(root: Path, case: str) -> None:
    image, label = paths(root, case)
    write(image, good_image())
    write(label, block_label([1]), spacing=(1.0, 1.0, 2.5))


def bad_origin(root: Path, case: str) -> None:
    image, label = paths(root, case)
    write(image, good_image())
    write(label, block_label([1]), origin=(0.0, 0.0, 5.0))


def bad_direction(root: Path, case: str) -> None:
    image, label = paths(root, case)
    write(image, good_image())
    write(label, block_label([1]), direction=ROTATED)


def bad_float_label(root: Path, case: str) -> None:
    image, label = paths(root, case)
    write(image, good_image())
    write(label, block_label([1]).astype(np.float32) * 0.5)


def bad_label_values(root: Path, case: str) -> None:
    image, label = paths(root, case)
    write(image, good_image())
    values = block_label([1, 2])
    values[values == 2] = 42
    write(label, values)


def bad_nan_image(root: Path, case: str) -> None:
    image, label = paths(root, case)
    array = good_image()
    array[0, 0, 0], array[1, 1, 1] = np.nan, np.inf
    write(image, array)
    write(label, block_label([1]))


# kind -> (builder, expected reason fragment, file at fault: "image" or "label")
BAD_KINDS: dict[str, tuple[Callable[[Path, str], None], str, str]] = {
    "unreadable_image": (bad_unreadable_image, "cannot be read", "image"),
    "truncated_gzip": (bad_truncated_gzip, "corrupt gzip data", "image"),
    "image_2d": (bad_2d_image, "expected a 3D volume, found 2D", "image"),
    "image_4d": (bad_4d_image, "expected a 3D volume, found 4D", "image"),
    "multichannel": (bad_multichannel_image, "expected one channel, found 3", "image"),
    "size_mismatch": (bad_size, "voxel grid: image size", "label"),
    "spacing_mismatch": (bad_spacing, "voxel grid: image spacing", "label"),
    "origin_mismatch": (bad_origin, "voxel grid: image origin", "label"),
    "direction_mismatch": (bad_direction, "voxel grid: image direction", "label"),
    "float_label": (bad_float_label, "integer voxel type, found float32", "label"),
    "label_values": (bad_label_values, "not in the label map", "label"),
    "nan_image": (bad_nan_image, "2 NaN or infinite voxel(s)", "image"),
}


def cli_args(root: Path, case: str, on_error: str, output: Path) -> list[str]:
    image, label = paths(root, case)
    args = ["case", "--case", case, "--image", str(image), "--label-map", LABEL_MAP, "--on-error", on_error,
            "--spacing-tolerance", "1e-3", "--origin-tolerance-mm", "1e-2", "--direction-tolerance", "1e-4",
            "--output", str(output)]
    return args + (["--label", str(label)] if label.exists() else [])


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_fails_naming_case_and_file(kind: str, tmp_path: Path, capsys) -> None:
    build, reason, at_fault = BAD_KINDS[kind]
    build(tmp_path, "bad")
    output = tmp_path / "qc" / "bad.json"
    assert qc.main(cli_args(tmp_path, "bad", "fail", output)) == 1
    message = capsys.readouterr().err
    faulty = paths(tmp_path, "bad")[0 if at_fault == "image" else 1]
    assert f"case 'bad' (file {faulty})" in message and reason in message, message
    assert not output.exists() and not list(output.parent.glob("*")), "no QC record (or temp file) may remain"


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_is_recorded_as_rejected_with_skip(kind: str, tmp_path: Path) -> None:
    build, reason, _ = BAD_KINDS[kind]
    build(tmp_path, "bad")
    output = tmp_path / "qc" / "bad.json"
    assert qc.main(cli_args(tmp_path, "bad", "skip", output)) == 0
    record = json.loads(output.read_text())
    assert record["status"] == "rejected"
    assert any(reason in r for r in record["reasons"]), record["reasons"]
    accepted, rejected = qc.summarize([record])
    assert accepted.empty and list(rejected["case"]) == ["bad"]


def test_good_cases_pass_and_record_geometry_and_values(tmp_path: Path) -> None:
    make_good(tmp_path, "strong")
    make_good(tmp_path, "none", classes=None)
    image, label = paths(tmp_path, "strong")
    record, problems = qc.check_case("strong", str(image), str(label), LABEL_IDS, {})
    assert not problems and record["status"] == "ok" and record["reasons"] == []
    assert record["label"]["values"] == list(range(15))
    assert record["image"]["size"] == [16, 16, 8] and record["image"]["spacing"] == list(SPACING)
    record, problems = qc.check_case("none", str(paths(tmp_path, "none")[0]), None, LABEL_IDS, {})
    assert not problems and record["label"] is None and not record["has_label"]


def test_geometry_within_tolerance_is_accepted(tmp_path: Path) -> None:
    image, label = paths(tmp_path, "c")
    write(image, good_image())
    write(label, block_label([1]), spacing=(1.0, 1.0, 2.0005), origin=(0.0, 0.005, 0.0))
    _, problems = qc.check_case("c", str(image), str(label), LABEL_IDS, {})
    assert not problems
    _, problems = qc.check_case("c", str(image), str(label), LABEL_IDS, {"spacing_rtol": 1e-5})
    assert len(problems) == 1
    assert problems[0].reason.startswith("label does not match the image's voxel grid: image spacing (1.0, 1.0, 2.0)")


def test_independent_problems_are_all_reported(tmp_path: Path) -> None:
    bad_nan_image(tmp_path, "c")
    image, label = paths(tmp_path, "c")
    values = block_label([1])
    values[0, 0, 0] = 99
    write(label, values, origin=(3.0, 0.0, 0.0))
    record, problems = qc.check_case("c", str(image), str(label), LABEL_IDS, {})
    assert len(problems) == 3 and record["status"] == "rejected"
    assert [p["file"] for p in record["problems"]] == [str(image), str(label), str(label)]


def test_image_problems_are_kept_when_the_label_is_unusable(tmp_path: Path) -> None:
    bad_nan_image(tmp_path, "c")
    image, label = paths(tmp_path, "c")
    write(label, block_label([1]).astype(np.float32) * 0.5)
    _, problems = qc.check_case("c", str(image), str(label), LABEL_IDS, {})
    assert [p.path for p in problems] == [str(image), str(label)]
    assert "NaN" in problems[0].reason and "integer voxel type" in problems[1].reason


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    image, label = paths(tmp_path, "c")
    _, problems = qc.check_case("c", str(image), str(label), LABEL_IDS, {})
    assert [str(p) for p in problems] == [f"case 'c' (file {image}): file does not exist"]
    write(image, good_image())
    _, problems = qc.check_case("c", str(image), str(label), LABEL_IDS, {})
    assert [str(p) for p in problems] == [f"case 'c' (file {label}): file does not exist"]


@pytest.mark.parametrize("case", ["with space", "a/b", "..x", "tab\tcase"])
def test_bad_case_ids_are_rejected(case: str, tmp_path: Path) -> None:
    _, problems = qc.check_case(case, str(tmp_path / "x_0000.nii.gz"), None, LABEL_IDS, {})
    assert len(problems) == 1 and "invalid case id" in problems[0].reason


def test_discovery_rejects_bad_ids_and_orphan_labels(tmp_path: Path) -> None:
    write(tmp_path / "imagesTr" / "has space_0000.nii.gz", good_image())
    with pytest.raises(CaseError, match=r"case 'has space' \(file .*has space_0000.nii.gz\): invalid case id"):
        discover_cases(str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr"), "_0000.nii.gz", ".nii.gz")
    (tmp_path / "imagesTr" / "has space_0000.nii.gz").unlink()
    make_good(tmp_path, "ok")
    write(tmp_path / "labelsTr" / "orphan.nii.gz", block_label([1]))
    with pytest.raises(CaseError, match=r"case 'orphan' .*label without an image"):
        discover_cases(str(tmp_path / "imagesTr"), str(tmp_path / "labelsTr"), "_0000.nii.gz", ".nii.gz")


def test_parse_label_map_rejects_malformed_items() -> None:
    entries = parse_label_map('[{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 14, "name": "Lesion", "kind": "lesion"}]')
    assert label_classes(entries)[14] == LabelClass(14, "Lesion", "lesion")
    for spec in ['[{"id": 1, "name": "Liver"}]', '[{"id": "x", "name": "Liver", "kind": "organ"}]',
                 '[{"id": 1, "name": "Liver", "kind": "bone"}]', "1:Liver:organ", "[]"]:
        with pytest.raises(ValueError, match="label map"):
            parse_label_map(spec)


def test_present_values_handles_negative_and_large_values() -> None:
    assert qc.present_values(np.array([[[0, 3, 3]]], np.uint8)) == [0, 3]
    assert qc.present_values(np.array([[[-5, 0, 70000]]], np.int32)) == [-5, 0, 70000]


# ---------------------------------------------------------------------------------------------------------------
# Through Snakemake: skip keeps bad cases out of every later stage, fail stops with the message.

GOOD = {"strong1": range(1, 15), "strong2": range(1, 14), "lesion": [14], "partial": [1, 3, 5], "nolabel": None}


def write_layout(root: Path, on_error: str, bad_kinds=()) -> Path:
    """A tiny FLARE-layout dataset (good cases plus one case per bad kind) and a config pointing at it."""
    for case, classes in GOOD.items():
        make_good(root, case, classes)
    for kind in bad_kinds:
        BAD_KINDS[kind][0](root, f"bad_{kind}")
    make_good(root / "test", "t1")
    (root / "labelsTr").mkdir(exist_ok=True)
    config = {
        "results": "results",
        "device": "cpu",
        "demo": {"enabled": False},
        "data": {"images": str(root / "imagesTr"), "labels": str(root / "labelsTr"),
                 "test_images": str(root / "test" / "imagesTr"), "test_labels": str(root / "test" / "labelsTr")},
        "qc": {"on_error": on_error, "mem_mb": 500, "runtime": 5},
        "stats": {"mem_mb": 500, "runtime": 5},
        "split": {"mem_mb": 500, "runtime": 5},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


TARGETS = ["results/split/split.tsv", "results/stats/label_stats.tsv"]


@pytest.mark.slow
def test_workflow_skip_excludes_every_bad_case(tmp_path: Path) -> None:
    config = write_layout(tmp_path / "data", "skip", sorted(BAD_KINDS))
    work = tmp_path / "work"
    run_workflow(work, *TARGETS, config=config)
    results = work / "results"
    rejected = pd.read_csv(results / "qc" / "rejected.tsv", sep="\t")
    split = pd.read_csv(results / "split" / "split.tsv", sep="\t", dtype=str, keep_default_na=False)
    for kind, (_, reason, at_fault) in BAD_KINDS.items():
        case = f"bad_{kind}"
        rows = rejected[rejected["case"] == case]
        assert any(reason in r for r in rows["reason"]), (case, list(rows["reason"]))
        assert rows["file"].iloc[0] == str(paths(tmp_path / "data", case)[0 if at_fault == "image" else 1])
        assert json.loads((results / "qc" / f"{case}.json").read_text())["status"] == "rejected"
        assert not (results / "stats" / "cases" / f"{case}.tsv").exists()
        assert case not in set(split["case"])
    assert dict(zip(split["case"], split["category"])) == {
        "lesion": "weak", "nolabel": "unlabeled", "partial": "weak", "strong1": "strong", "strong2": "strong"}
    assert dict(zip(split["case"], split["classes"]))["partial"] == "1,3,5"
    log = (results / "logs" / "split" / "all.log").read_text()
    assert "2 strong, 2 weak, 1 unlabeled" in log


@pytest.mark.slow
def test_workflow_fail_stops_with_message_and_no_outputs(tmp_path: Path) -> None:
    config = write_layout(tmp_path / "data", "fail", ["spacing_mismatch"])
    work = tmp_path / "work"
    proc = run_workflow(work, *TARGETS, "--keep-going", config=config, check=False)
    assert proc.returncode != 0
    label = paths(tmp_path / "data", "bad_spacing_mismatch")[1]
    log = (work / "results" / "logs" / "qc_case" / "bad_spacing_mismatch.log").read_text()
    assert f"case 'bad_spacing_mismatch' (file {label}): label does not match" in log
    assert "bad_spacing_mismatch" in proc.stdout + proc.stderr
    results = work / "results"
    assert not (results / "qc" / "bad_spacing_mismatch.json").exists()
    assert (results / "qc" / "strong1.json").exists()  # --keep-going: the good cases were still checked
    assert not (results / "qc" / "accepted.tsv").exists()
    assert not (results / "stats").exists() and not (results / "split").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bad_file, message", [
    ("imagesTr/bad case_0000.nii.gz", "case 'bad case' (file"),
    ("labelsTr/orphan.nii.gz", "case 'orphan' (file"),
])
def test_workflow_refuses_to_plan_bad_layouts(bad_file: str, message: str, tmp_path: Path) -> None:
    config = write_layout(tmp_path / "data", "skip")
    write(tmp_path / "data" / bad_file, block_label([1]))
    proc = run_workflow(tmp_path / "work", "-n", *TARGETS, config=config, check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-3000:]
