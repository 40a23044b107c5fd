"""Label merging: the paper's per-class rule as properties (hypothesis), hand examples, and the CLI on files."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import REPO
from workflow_scripts.labels.merge import (
    TABLE_COLUMNS,
    LabelValuesError,
    MergeSettings,
    case_table,
    input_flags,
    main,
    merge_labels,
    merged_dtype,
    rule_inputs,
    settings_from_config,
    value_counts,
)
from workflow_scripts.io.label_map import ignore_label
from workflow_scripts.io.volumes import CaseError

# a small FLARE-like label map: organs 1-5, lesion 6; the teacher predicts organs only
LABELS = [{"id": i, "name": f"Organ{i}", "kind": "organ"} for i in range(1, 6)] + [
    {"id": 6, "name": "Lesion", "kind": "lesion"}
]
LABEL_IDS = (1, 2, 3, 4, 5, 6)
ORGANS = (1, 2, 3, 4, 5)
IGNORE = 7


def make_settings(min_confidence: float = 0.0, low_confidence_as: str = "background",
                  fill_classes=ORGANS) -> MergeSettings:
    return settings_from_config(LABELS, fill_classes, min_confidence, low_confidence_as)


@st.composite
def merge_inputs(draw):
    """Random small weak/pseudo/confidence arrays with a random subset of classes present in the weak label."""
    shape = draw(st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)))
    weak_classes = draw(st.lists(st.sampled_from(LABEL_IDS), unique=True, max_size=len(LABEL_IDS)))
    fill_classes = tuple(draw(st.lists(st.sampled_from(ORGANS), unique=True, min_size=1)))
    pseudo_classes = draw(st.lists(st.sampled_from(fill_classes), unique=True))
    weak = draw(arrays(np.uint8, shape, elements=st.sampled_from([0, *weak_classes])))
    pseudo = draw(arrays(np.uint8, shape, elements=st.sampled_from([0, *pseudo_classes])))
    confidence = draw(arrays(np.uint8, shape))
    config = make_settings(draw(st.floats(0, 1)), draw(st.sampled_from(["background", "ignore"])), fill_classes)
    return weak, pseudo, confidence, config


def paper_rule(weak: np.ndarray, pseudo: np.ndarray, confidence: np.ndarray, config: MergeSettings) -> np.ndarray:
    """The paper's rule written literally, one class and one voxel at a time: the oracle for the vectorised merge."""
    merged = weak.astype(np.int64)
    present = set(np.unique(weak).tolist())
    for cls in config.fill_classes:
        if cls in present:
            continue  # the class is annotated: its pseudo-label is discarded
        for index in zip(*np.nonzero(pseudo == cls)):
            if weak[index] != 0:
                continue
            if confidence[index] / 255.0 < config.min_confidence:
                merged[index] = config.ignore if config.low_confidence_as == "ignore" else 0
            else:
                merged[index] = cls
    return merged


@settings(max_examples=200, deadline=None)
@given(merge_inputs())
def test_every_annotated_voxel_is_preserved(inputs) -> None:
    weak, pseudo, confidence, config = inputs
    merged = merge_labels(weak, pseudo, confidence, config).merged
    annotated = weak != 0
    np.testing.assert_array_equal(merged[annotated], weak[annotated])


@settings(max_examples=200, deadline=None)
@given(merge_inputs())
def test_classes_present_in_weak_label_gain_no_voxels(inputs) -> None:
    weak, pseudo, confidence, config = inputs
    merged = merge_labels(weak, pseudo, confidence, config).merged
    for cls in np.unique(weak[weak != 0]):
        assert np.count_nonzero(merged == cls) == np.count_nonzero(weak == cls)


@settings(max_examples=200, deadline=None)
@given(merge_inputs())
def test_output_only_contains_allowed_labels(inputs) -> None:
    weak, pseudo, confidence, config = inputs
    merged = merge_labels(weak, pseudo, confidence, config).merged
    allowed = {0, *config.label_ids} | ({config.ignore} if config.low_confidence_as == "ignore" else set())
    assert set(np.unique(merged).tolist()) <= allowed
    # only teacher classes can appear where the weak label was background
    assert set(np.unique(merged[weak == 0]).tolist()) <= {0, config.ignore, *config.fill_classes}


@settings(max_examples=200, deadline=None)
@given(merge_inputs())
def test_shape_and_type_are_kept_and_result_matches_the_paper_rule(inputs) -> None:
    weak, pseudo, confidence, config = inputs
    result = merge_labels(weak, pseudo, confidence, config)
    assert result.merged.shape == weak.shape
    assert result.merged.dtype == np.uint8
    np.testing.assert_array_equal(result.merged, paper_rule(weak, pseudo, confidence, config))
    # the reported counts agree with the volume
    gained = np.bincount(result.merged[weak == 0], minlength=IGNORE + 1)
    np.testing.assert_array_equal(result.filled[1:], gained[1 : IGNORE])
    assert result.ignored.sum() == gained[IGNORE]


@settings(max_examples=200, deadline=None)
@given(merge_inputs())
def test_low_confidence_voxels_become_ignore_or_background(inputs) -> None:
    weak, pseudo, confidence, config = inputs
    result = merge_labels(weak, pseudo, confidence, config)
    annotated = {c for c in np.unique(weak).tolist() if c}
    candidate = (weak == 0) & np.isin(pseudo, [c for c in config.fill_classes if c not in annotated])
    low = candidate & (confidence / 255.0 < config.min_confidence)
    expected_low_value = config.ignore if config.low_confidence_as == "ignore" else 0
    assert np.all(result.merged[low] == expected_low_value)
    np.testing.assert_array_equal(result.merged[candidate & ~low], pseudo[candidate & ~low])
    if config.low_confidence_as == "background":
        assert not np.any(result.merged == config.ignore)
    low_per_class = np.bincount(pseudo[low], minlength=IGNORE)
    np.testing.assert_array_equal(result.low_confidence, low_per_class)
    np.testing.assert_array_equal(result.ignored, low_per_class if config.low_confidence_as == "ignore" else 0)


@settings(max_examples=100, deadline=None)
@given(values=arrays(np.uint16, st.integers(0, 60), elements=st.integers(0, 40)), n_values=st.integers(1, 20),
       chunk=st.integers(1, 16))
def test_chunked_counting_equals_bincount(values, n_values, chunk) -> None:
    counts = value_counts(values, n_values, chunk=chunk)
    expected = np.bincount(values, minlength=n_values)
    np.testing.assert_array_equal(counts, expected)


def test_a_lesion_is_never_overwritten_by_a_pseudo_organ() -> None:
    weak = np.array([[[6, 6, 0, 0]]], np.uint8)
    pseudo = np.array([[[1, 1, 1, 0]]], np.uint8)
    merged = merge_labels(weak, pseudo, np.full_like(weak, 255), make_settings()).merged
    np.testing.assert_array_equal(merged, [[[6, 6, 1, 0]]])


def test_an_annotated_class_discards_its_pseudo_voxels_even_outside_the_annotation() -> None:
    weak = np.array([[[2, 0, 0, 0, 0]]], np.uint8)
    pseudo = np.array([[[2, 2, 2, 3, 0]]], np.uint8)
    result = merge_labels(weak, pseudo, np.full_like(weak, 255), make_settings())
    np.testing.assert_array_equal(result.merged, [[[2, 0, 0, 3, 0]]])
    assert result.annotated[2] and not result.annotated[3]
    assert result.filled[2] == 0 and result.filled[3] == 1
    assert result.pseudo_voxels[2] == 3


def test_confidence_threshold_is_exact_on_the_uint8_scale() -> None:
    """51 / 255 == 0.2 exactly: a voxel at the threshold is trusted, one step below is not."""
    weak = np.zeros((1, 1, 3), np.uint8)
    pseudo = np.array([[[1, 1, 1]]], np.uint8)
    confidence = np.array([[[50, 51, 52]]], np.uint8)
    result = merge_labels(weak, pseudo, confidence, make_settings(0.2, "ignore"))
    np.testing.assert_array_equal(result.merged, [[[IGNORE, 1, 1]]])
    assert result.ignored[1] == 1 and result.filled[1] == 2
    background = merge_labels(weak, pseudo, confidence, make_settings(0.2, "background")).merged
    np.testing.assert_array_equal(background, [[[0, 1, 1]]])


def test_values_outside_the_label_map_or_teacher_classes_are_rejected() -> None:
    ok = np.zeros((1, 1, 2), np.uint8)
    with pytest.raises(LabelValuesError, match=r"weak label holds values \[9\]") as err:
        merge_labels(np.array([[[0, 9]]], np.uint8), ok, ok, make_settings())
    assert err.value.which == "weak"
    with pytest.raises(LabelValuesError, match=r"pseudo label holds values \[6\]") as err:
        merge_labels(ok, np.array([[[6, 0]]], np.uint8), ok, make_settings())  # lesion: not a teacher class
    assert err.value.which == "pseudo"
    with pytest.raises(LabelValuesError, match="negative"):
        merge_labels(np.array([[[0, -1]]], np.int16), ok, ok, make_settings())
    with pytest.raises(LabelValuesError, match="uint8") as err:
        merge_labels(ok, ok, np.zeros((1, 1, 2), np.uint16), make_settings(0.5))
    assert err.value.which == "confidence"


def test_a_student_pseudo_label_may_hold_every_class_and_only_the_fill_classes_fill() -> None:
    """A later round's pseudo-labeller (README, "Rounds") is a student that predicts the lesion too: with
    pseudo_classes its lesion voxels are accepted and dropped (lesion not a fill class), or filled where the lesion
    is one; annotated voxels never change either way."""
    weak = np.array([[[2, 0, 0, 0, 0]]], np.uint8)
    pseudo = np.array([[[6, 6, 3, 0, 6]]], np.uint8)
    every = settings_from_config(LABELS, ORGANS, 0.0, "background", LABEL_IDS)
    result = merge_labels(weak, pseudo, np.full_like(weak, 255), every)
    np.testing.assert_array_equal(result.merged, [[[2, 0, 3, 0, 0]]])
    assert result.pseudo_voxels[6] == 3 and result.filled[6] == 0
    with_lesion = settings_from_config(LABELS, LABEL_IDS, 0.0, "background", LABEL_IDS)
    np.testing.assert_array_equal(merge_labels(weak, pseudo, np.full_like(weak, 255), with_lesion).merged,
                                  [[[2, 6, 3, 0, 6]]])
    with pytest.raises(ValueError, match=r"pseudo classes \[8\] are not in the label map"):
        settings_from_config(LABELS, ORGANS, 0.0, "background", [1, 8])


def test_ignore_label_is_one_above_the_highest_id() -> None:
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    assert ignore_label(schema["properties"]["labels"]["default"]) == 15  # FLARE23: ids 1-14
    assert ignore_label([{"id": 3}, {"id": 1}]) == 4
    assert merged_dtype(15) == np.uint8 and merged_dtype(256) == np.uint16


def test_settings_reject_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="not in the label map"):
        settings_from_config(LABELS, [1, 8], 0.0, "background")
    with pytest.raises(ValueError, match="low_confidence_as"):
        settings_from_config(LABELS, [1], 0.0, "zero")


def test_rule_inputs_per_category() -> None:
    strong, merged = ["s1"], ["s1", "w1", "u1"]
    assert rule_inputs("s1", strong, merged, "raw/s1.nii.gz", "res/pseudo") == {"weak": "raw/s1.nii.gz"}
    assert rule_inputs("w1", strong, merged, "raw/w1.nii.gz", "res/pseudo") == {
        "pseudo": "res/pseudo/w1.nii.gz", "confidence": "res/pseudo/w1_confidence.nii.gz", "weak": "raw/w1.nii.gz"}
    assert "weak" not in rule_inputs("u1", strong, merged, None, "res/pseudo")
    with pytest.raises(ValueError, match="include_unlabeled"):
        rule_inputs("u1", strong, ["s1", "w1"], None, "res/pseudo")


def test_input_flags_are_shell_quoted() -> None:
    assert input_flags([("weak", "a b/x.nii.gz"), ("pseudo", "p.nii.gz")]) == "--weak 'a b/x.nii.gz' --pseudo p.nii.gz"


# --- files and CLI ---------------------------------------------------------------------------------------------

SPACING = (0.8, 0.75, 2.5)
ORIGIN = (-120.5, 33.25, 410.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a rotated (non-identity) orientation


def write(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def case_files(tmp_path: Path, weak: np.ndarray | None, pseudo: np.ndarray | None,
               confidence: np.ndarray | None = None, **geometry) -> dict[str, Path]:
    files = {}
    if weak is not None:
        files["weak"] = write(tmp_path / "weak.nii.gz", weak, **geometry)
    if pseudo is not None:
        files["pseudo"] = write(tmp_path / "pseudo.nii.gz", pseudo)
        conf = np.full(pseudo.shape, 255, np.uint8) if confidence is None else confidence
        files["confidence"] = write(tmp_path / "pseudo_confidence.nii.gz", conf)
    return files


def cli_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = ["case", "--case", "case_01", "--label-map", json.dumps(LABELS), "--fill-classes", *map(str, ORGANS),
            "--output-label", str(out / "case_01.nii.gz"), "--output-table", str(out / "case_01.tsv"), *extra]
    for name, path in files.items():
        args += [f"--{name}", str(path)]
    return args


def random_case(seed: int, shape=(5, 6, 7)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weak = rng.choice(np.array([0, 0, 0, 2, 6], np.uint8), size=shape)
    pseudo = rng.choice(np.array([0, 1, 2, 3], np.uint8), size=shape)
    confidence = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return weak, pseudo, confidence


def test_cli_merges_and_keeps_the_geometry_bit_for_bit(tmp_path: Path) -> None:
    weak, pseudo, confidence = random_case(0)
    files = case_files(tmp_path, weak, pseudo, confidence)
    out = tmp_path / "merged"
    assert main(cli_args(files, out, "--min-confidence", "0.4", "--low-confidence-as", "ignore")) == 0
    merged = sitk.ReadImage(str(out / "case_01.nii.gz"))
    reference = sitk.ReadImage(str(files["weak"]))
    assert merged.GetSpacing() == reference.GetSpacing()
    assert merged.GetOrigin() == reference.GetOrigin()
    assert merged.GetDirection() == reference.GetDirection()
    assert merged.GetSize() == reference.GetSize()
    expected = merge_labels(weak, pseudo, confidence, make_settings(0.4, "ignore"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(merged), expected.merged)

    table = pd.read_csv(out / "case_01.tsv", sep="\t")
    assert list(table.columns) == ["class_id", "name", "annotated", "pseudo_voxels", "filled_voxels", "filled_ml",
                                   "low_confidence_voxels", "ignored_voxels"] == list(TABLE_COLUMNS)
    assert list(table["class_id"]) == list(LABEL_IDS)
    assert table.set_index("class_id").loc[[2, 6], "annotated"].all()
    assert table.set_index("class_id").loc[2, "filled_voxels"] == 0
    assert table["filled_voxels"].tolist() == expected.filled[list(LABEL_IDS)].tolist()
    assert table["ignored_voxels"].sum() == np.count_nonzero(expected.merged == IGNORE) > 0
    voxel_ml = np.prod(SPACING) / 1000
    np.testing.assert_allclose(table["filled_ml"], table["filled_voxels"] * voxel_ml, atol=1e-4)


def test_strong_case_passes_through_unchanged(tmp_path: Path) -> None:
    raw = np.random.default_rng(1).integers(0, 7, size=(4, 5, 6)).astype(np.int16)  # any integer voxel type
    files = case_files(tmp_path, raw, None)
    out = tmp_path / "merged"
    assert main(cli_args(files, out)) == 0
    merged = sitk.ReadImage(str(out / "case_01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(merged), raw)
    reference = sitk.ReadImage(str(files["weak"]))
    assert (merged.GetSpacing(), merged.GetOrigin(), merged.GetDirection()) == (
        reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection())
    table = pd.read_csv(out / "case_01.tsv", sep="\t")
    assert table["filled_voxels"].sum() == 0 and table["pseudo_voxels"].sum() == 0
    assert table["annotated"].tolist() == [bool(np.any(raw == c)) for c in LABEL_IDS]


def test_unlabeled_case_takes_the_pseudo_label(tmp_path: Path) -> None:
    _, pseudo, _ = random_case(2)
    files = case_files(tmp_path, None, pseudo)
    out = tmp_path / "merged"
    assert main(cli_args(files, out)) == 0
    merged = sitk.ReadImage(str(out / "case_01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(merged), pseudo)
    assert merged.GetDirection() == sitk.ReadImage(str(files["pseudo"])).GetDirection()


@st.composite
def geometries(draw):
    """Random spacing and origin; the direction a random axis permutation with flips (how scanners store CT) or,
    half of the time, a random oblique rotation."""
    spacing = tuple(draw(st.floats(0.3, 5.0)) for _ in range(3))
    origin = tuple(draw(st.floats(-500, 500)) for _ in range(3))
    if draw(st.booleans()):
        matrix = np.eye(3)[draw(st.permutations(range(3)))] * np.array(draw(st.lists(st.sampled_from([-1, 1]),
                                                                                     min_size=3, max_size=3)))
    else:
        matrix, _ = np.linalg.qr(np.array(draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))).reshape(3, 3)
                                 + 3 * np.eye(3))
    matrix *= np.sign(np.linalg.det(matrix))  # a proper rotation, as NIfTI requires
    return {"spacing": spacing, "origin": origin, "direction": tuple(matrix.ravel().tolist())}


@settings(max_examples=20, deadline=None)
@given(geometry=geometries(), seed=st.integers(0, 2**16))
def test_merged_file_has_the_input_geometry(tmp_path_factory, geometry, seed) -> None:
    """Bit-for-bit for axis-aligned directions; an oblique direction only survives NIfTI's float32 quaternion
    storage to ~1e-7, whoever writes it, so there the check allows 1e-6."""
    tmp_path = tmp_path_factory.mktemp("geometry")
    weak, pseudo, confidence = random_case(seed, shape=(3, 4, 5))
    paths = {"weak": write(tmp_path / "weak.nii.gz", weak, **geometry),
             "pseudo": write(tmp_path / "pseudo.nii.gz", pseudo, **geometry),
             "confidence": write(tmp_path / "pseudo_confidence.nii.gz", confidence, **geometry)}
    assert main(cli_args(paths, tmp_path)) == 0
    merged = sitk.ReadImage(str(tmp_path / "case_01.nii.gz"))
    reference = sitk.ReadImage(str(paths["weak"]))
    assert (merged.GetSize(), merged.GetSpacing(), merged.GetOrigin()) == (
        reference.GetSize(), reference.GetSpacing(), reference.GetOrigin())
    if set(np.abs(geometry["direction"])) <= {0.0, 1.0}:
        assert merged.GetDirection() == reference.GetDirection()
    else:
        np.testing.assert_allclose(merged.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mismatch", [{"spacing": (0.8, 0.75, 3.0)}, {"origin": (0.0, 0.0, 0.0)},
                                      {"direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}])
def test_geometry_mismatch_names_case_and_both_files_and_writes_nothing(tmp_path: Path, mismatch) -> None:
    weak, pseudo, confidence = random_case(3)
    files = case_files(tmp_path, weak, pseudo, confidence, **mismatch)
    out = tmp_path / "merged"
    with pytest.raises(CaseError) as err:
        main(cli_args(files, out))
    message = str(err.value)
    assert "'case_01'" in message and str(files["weak"]) in message and str(files["pseudo"]) in message
    assert next(iter(mismatch)) in message
    assert not out.exists() or not any(out.iterdir())


def test_geometry_tolerances_come_from_the_command_line(tmp_path: Path) -> None:
    weak, pseudo, confidence = random_case(7)
    shifted = (ORIGIN[0] + 0.005, *ORIGIN[1:])  # 5 µm: within the default 0.01 mm
    files = case_files(tmp_path, weak, pseudo, confidence, origin=shifted)
    assert main(cli_args(files, tmp_path / "default")) == 0
    with pytest.raises(CaseError, match="origin"):
        main(cli_args(files, tmp_path / "strict", "--origin-tolerance-mm", "0.001"))


def test_shape_mismatch_is_a_geometry_error(tmp_path: Path) -> None:
    weak, pseudo, confidence = random_case(4)
    files = case_files(tmp_path, weak[:, :-1], pseudo, confidence)
    with pytest.raises(CaseError, match="size"):
        main(cli_args(files, tmp_path / "merged"))


def test_bad_values_name_the_offending_file(tmp_path: Path) -> None:
    weak, pseudo, confidence = random_case(5)
    pseudo[0, 0, 0] = 6  # the lesion is not a teacher class
    files = case_files(tmp_path, weak, pseudo, confidence)
    out = tmp_path / "merged"
    with pytest.raises(CaseError, match=r"pseudo label holds values \[6\]") as err:
        main(cli_args(files, out))
    assert err.value.path == str(files["pseudo"])
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_signed_pseudo_label_names_case_and_file_and_writes_nothing(tmp_path: Path, dtype) -> None:
    weak, pseudo, confidence = random_case(8)
    files = case_files(tmp_path, weak, pseudo.astype(dtype), confidence)
    out = tmp_path / "merged"
    with pytest.raises(CaseError, match=f"unsigned integer voxel type.*found {np.dtype(dtype).name}") as err:
        main(cli_args(files, out))
    assert err.value.case == "case_01" and err.value.path == str(files["pseudo"])
    assert not out.exists() or not any(out.iterdir())


def test_wider_unsigned_pseudo_label_merges_like_uint8(tmp_path: Path) -> None:
    weak, pseudo, confidence = random_case(8)
    merged = {}
    for dtype in (np.uint8, np.uint16):
        folder = tmp_path / np.dtype(dtype).name
        folder.mkdir()
        assert main(cli_args(case_files(folder, weak, pseudo.astype(dtype), confidence), folder / "merged")) == 0
        merged[dtype] = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "merged" / "case_01.nii.gz")))
    np.testing.assert_array_equal(merged[np.uint8], merged[np.uint16])


def test_cli_failure_exits_nonzero_with_a_clear_message_and_leaves_no_output(tmp_path: Path) -> None:
    weak, pseudo, confidence = random_case(6)
    files = case_files(tmp_path, weak, pseudo, confidence)
    files["confidence"].write_bytes(b"not a volume")  # corrupt after the fact
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "workflow_scripts.labels.merge", *cli_args(files, out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "case 'case_01'" in proc.stderr and str(files["confidence"]) in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_summary_has_one_row_per_case_with_category_fills_and_ignored(tmp_path: Path) -> None:
    config = make_settings(0.5, "ignore")
    tables = {}
    for seed, case in enumerate(["weak_a", "strong_b"]):
        weak, pseudo, confidence = random_case(seed)
        if case.startswith("strong"):
            pseudo = np.zeros_like(pseudo)
        result = merge_labels(weak, pseudo, confidence, config)
        tables[case] = tmp_path / f"{case}.tsv"
        case_table(result, LABELS, 2.0).to_csv(tables[case], sep="\t", index=False)
    split = tmp_path / "split.tsv"
    pd.DataFrame({"case": ["strong_b", "weak_a", "other"], "category": ["strong", "weak", "unlabeled"]}).to_csv(
        split, sep="\t", index=False)
    out = tmp_path / "summary.tsv"
    assert main(["summary", "--split", str(split), "--tables", *map(str, tables.values()), "--output", str(out)]) == 0
    summary = pd.read_csv(out, sep="\t").set_index("case")
    assert list(summary.index) == ["weak_a", "strong_b"]
    assert summary.loc["weak_a", "category"] == "weak" and summary.loc["strong_b", "category"] == "strong"
    weak_table = pd.read_csv(tables["weak_a"], sep="\t")
    assert summary.loc["weak_a", "filled_Organ3"] == weak_table.loc[weak_table["class_id"] == 3, "filled_voxels"].item()
    assert summary.loc["weak_a", "filled_total"] == weak_table["filled_voxels"].sum() > 0
    assert summary.loc["weak_a", "ignored_voxels"] == weak_table["ignored_voxels"].sum() > 0
    assert summary.loc["weak_a", "low_confidence_voxels"] == summary.loc["weak_a", "ignored_voxels"]
    # a file that is not a merge table (as a stale DAG could hand over) is an error naming it, with no output
    with pytest.raises(CaseError, match="not a merge table") as err:
        main(["summary", "--split", str(split), "--tables", str(split), "--output", str(tmp_path / "bad.tsv")])
    assert err.value.path == str(split)
    assert not (tmp_path / "bad.tsv").exists()
    assert summary.loc["strong_b", "filled_total"] == 0
    assert summary.loc["weak_a", "annotated_classes"] == "2,6"


# --- the rules, in a minimal workflow: the real common.smk and merge.smk plus a split checkpoint stub --------------

HARNESS = f"""
from snakemake.utils import validate

configfile: "config.yaml"
validate(config, schema={str(REPO / "config" / "schema.yaml")!r})

include: {str(REPO / "rules" / "common.smk")!r}
include: {str(REPO / "rules" / "merge.smk")!r}

checkpoint split:
    input: "split_source.tsv"
    output: split=res("split", "split.tsv")
    shell: "cp {{input}} {{output.split}}"

# stands in for a student stage: what merged_label_files() and training_label() hand it
rule training_labels:
    input: merged_label_files
    output: "training_labels.json"
    run:
        import json
        labels = {{case: training_label(case, "merged") for case in merged_label_cases()}}
        raw = {{case: training_label(case, "raw") for case in merged_label_cases() if TRAIN[case]["label"]}}
        json.dump({{"inputs": list(input), "merged": labels, "raw": raw}}, open(output[0], "w"))
"""


def harness(tmp_path: Path, merge: dict, include_unlabeled: bool) -> None:
    config = {
        "demo": {"enabled": False},
        "data": {name: str(tmp_path / "data" / name) for name in ("images", "labels", "test_images", "test_labels")},
        "labels": [{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 2, "name": "Spleen", "kind": "organ"},
                   {"id": 3, "name": "Lesion", "kind": "lesion"}],
        "teacher": {"classes": [1, 2]},
        "pseudo": {"include_unlabeled": include_unlabeled},
        "merge": {**merge, "mem_mb": 500, "runtime": 2},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "Snakefile").write_text(HARNESS)


def snakemake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(tmp_path),
                           "--snakefile", str(tmp_path / "Snakefile"), *args, "results/merged/summary.tsv",
                           "training_labels.json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_merge_rules_build_every_category_and_rerun_on_merge_params(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    shape = (4, 6, 8)
    for name in ("images", "labels", "test_images", "test_labels"):
        (tmp_path / "data" / name).mkdir(parents=True)
    strong = rng.choice(np.array([0, 1, 2, 3], np.uint8), size=shape)
    weak = rng.choice(np.array([0, 0, 1, 3], np.uint8), size=shape)  # Spleen missing: the pseudo-label fills it
    for case, label in {"s1": strong, "w1": weak, "u1": None}.items():
        (tmp_path / "data" / "images" / f"{case}_0000.nii.gz").write_bytes(b"")  # only listed, never read here
        if label is not None:
            write(tmp_path / "data" / "labels" / f"{case}.nii.gz", label)
    pseudo = {case: rng.choice(np.array([0, 1, 2], np.uint8), size=shape) for case in ("w1", "u1")}
    confidence = {case: rng.integers(0, 256, size=shape, dtype=np.uint8) for case in ("w1", "u1")}
    (tmp_path / "results" / "pseudo").mkdir(parents=True)
    for case in pseudo:
        write(tmp_path / "results" / "pseudo" / f"{case}.nii.gz", pseudo[case])
        write(tmp_path / "results" / "pseudo" / f"{case}_confidence.nii.gz", confidence[case])
    pd.DataFrame({"case": ["s1", "w1", "u1"], "category": ["strong", "weak", "unlabeled"]}).to_csv(
        tmp_path / "split_source.tsv", sep="\t", index=False)
    merged_dir = tmp_path / "results" / "merged"

    def merged(case: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(merged_dir / f"{case}.nii.gz")))

    harness(tmp_path, {"min_confidence": 0.0, "low_confidence_as": "background"}, include_unlabeled=False)
    snakemake(tmp_path)
    np.testing.assert_array_equal(merged("s1"), strong)
    np.testing.assert_array_equal(merged("w1"), np.where((weak == 0) & (pseudo["w1"] == 2), 2, weak))
    assert not (merged_dir / "u1.nii.gz").exists()
    summary = pd.read_csv(merged_dir / "summary.tsv", sep="\t").set_index("case")
    assert summary["category"].to_dict() == {"s1": "strong", "w1": "weak"}
    assert summary.loc["w1", "filled_Spleen"] == np.count_nonzero((weak == 0) & (pseudo["w1"] == 2)) > 0
    assert (tmp_path / "results" / "logs" / "merge_case" / "w1.log").read_text().startswith("case w1:")
    assert (tmp_path / "results" / "benchmarks" / "merge_case" / "w1.tsv").exists()
    handed = json.loads((tmp_path / "training_labels.json").read_text())
    assert handed["merged"] == {"s1": "results/merged/s1.nii.gz", "w1": "results/merged/w1.nii.gz"}
    assert handed["inputs"] == list(handed["merged"].values())
    assert handed["raw"] == {case: str(tmp_path / "data" / "labels" / f"{case}.nii.gz") for case in ("s1", "w1")}

    # a changed merge parameter reruns the merge jobs (params trigger) but nothing upstream
    harness(tmp_path, {"min_confidence": 0.5, "low_confidence_as": "ignore"}, include_unlabeled=True)
    dry = snakemake(tmp_path, "--dry-run").stdout
    assert re.search(r"^merge_case\s+3$", dry, re.M) and re.search(r"^merge_summary\s+1$", dry, re.M)
    assert not re.search(r"^split\s+\d", dry, re.M)
    assert "Params have changed" in dry
    snakemake(tmp_path)
    candidates = (weak == 0) & (pseudo["w1"] == 2)
    low = confidence["w1"] / 255 < 0.5
    np.testing.assert_array_equal(merged("w1")[candidates & low], 4)  # ignore label: 3 + 1
    np.testing.assert_array_equal(merged("w1")[candidates & ~low], 2)
    unlabeled_expected = np.where(pseudo["u1"] == 0, 0, np.where(confidence["u1"] / 255 < 0.5, 4, pseudo["u1"]))
    np.testing.assert_array_equal(merged("u1"), unlabeled_expected)
    summary = pd.read_csv(merged_dir / "summary.tsv", sep="\t").set_index("case")
    assert summary["category"].to_dict() == {"s1": "strong", "w1": "weak", "u1": "unlabeled"}
    assert summary.loc["w1", "ignored_voxels"] == np.count_nonzero(candidates & low) > 0
    handed = json.loads((tmp_path / "training_labels.json").read_text())
    assert handed["inputs"] == [f"results/merged/{case}.nii.gz" for case in ("s1", "w1", "u1")]
    assert sorted(handed["raw"]) == ["s1", "w1"]  # an unlabeled case has no raw label
