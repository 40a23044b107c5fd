"""Tests of the pseudo-labels: shards, confidence encoding, connected-component cleanup, geometry, the shard CLI
(complete folder or none). The workflow part (teacher -> pseudo-labels -> merge on the tiny config) is in
test_reruns.py, which also changes the data afterwards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

import tiny_nnunet as tn
from workflow_scripts.labels import pseudo as pl
from workflow_scripts.labels.postprocess import ComponentRule
from workflow_scripts.io.volumes import Geometry

LABELS = [{"id": i, "name": n, "kind": "lesion" if i == 14 else "organ"} for i, n in tn.LABEL_NAMES.items()]
POSTPROCESS = {"organ": {"keep_largest": 1, "min_size_mm3": 0}, "lesion": {"keep_largest": 0, "min_size_mm3": 10}}


def test_shards_cover_every_case_in_order_and_are_named_after_their_first_case():
    cases = [f"FLARE23_{i:04d}" for i in range(1, 401)]
    shards = pl.shard_cases(cases, 10)
    assert [case for members in shards.values() for case in members] == cases
    assert all(name == members[0] for name, members in shards.items())
    assert all(1 <= len(members) <= 20 for members in shards.values())
    assert 20 <= len(shards) <= 80  # 10 cases per shard on average
    assert pl.shard_of("FLARE23_0007", shards) in shards
    with pytest.raises(ValueError, match="'x' gets no pseudo-label"):
        pl.shard_of("x", shards)
    with pytest.raises(ValueError):
        pl.shard_cases(["a"], 0)
    assert pl.shard_cases(["a", "b", "c"], 1) == {"a": ["a"], "b": ["b"], "c": ["c"]}


def test_adding_or_removing_a_case_changes_only_the_shard_around_it():
    cases = [f"FLARE23_{i:04d}" for i in range(1, 401, 2)]
    before = pl.shard_cases(cases, 8)
    for changed in (sorted(cases + ["FLARE23_0100"]), [case for case in cases if case != "FLARE23_0101"]):
        after = pl.shard_cases(changed, 8)
        rerun = [name for name, members in after.items() if before.get(name) != members]
        assert 1 <= len(rerun) <= 2, rerun
        assert sum(len(after[name]) for name in rerun) <= 4 * 8


def test_confidence_is_stored_as_rounded_bytes():
    probability = np.array([0.0, 1 / 3, 0.5, 0.999, 1.0, 1.0000001], np.float32)
    stored = pl.encode_confidence(probability)
    assert stored.dtype == np.uint8 and stored.tolist() == [0, 85, 128, 255, 255, 255]
    assert np.abs(pl.decode_confidence(stored) - np.clip(probability, 0, 1)).max() <= 0.5 / 255 + 1e-7


def test_written_pseudo_label_is_cleaned_and_keeps_geometry(tmp_path):
    geometry = Geometry(size=(12, 10, 8), spacing=(1.0, 2.0, 3.0), origin=(1.0, 2.0, 3.0),
                        direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    label = np.zeros(geometry.shape_zyx, np.uint8)
    label[1:5, 1:5, 1:5] = 1  # organ: the largest component stays ...
    label[6, 8, 10] = 1  # ... the stray voxel goes
    label[6:8, 1:3, 6:9] = 14  # lesion of 12 voxels * 6 mm3: kept (>= 10 mm3)
    label[0, 9, 0] = 14  # lesion of 6 mm3: removed
    confidence = np.full(geometry.shape_zyx, 0.75, np.float32)
    rules = {1: ComponentRule(1, 0), 14: ComponentRule(0, 10)}
    label_path, confidence_path = pl.write_pseudo_label(tmp_path, "c1", label, confidence, geometry, rules)
    assert Path(label_path).name == "c1.nii.gz" and Path(confidence_path).name == "c1_confidence.nii.gz"
    written = sitk.ReadImage(label_path)
    array = sitk.GetArrayFromImage(written)
    assert written.GetPixelID() == sitk.sitkUInt8 and Geometry.of(written) == geometry
    assert (array == 1).sum() == 64 and array[6, 8, 10] == 0
    assert (array == 14).sum() == 12 and array[0, 9, 0] == 0
    stored = sitk.ReadImage(confidence_path)
    assert stored.GetPixelID() == sitk.sitkUInt8 and Geometry.of(stored) == geometry
    assert set(np.unique(sitk.GetArrayFromImage(stored))) == {191}


def _shard_argv(model: dict, cases, images, out: Path) -> list[str]:
    return ["--models", str(model["model"]), "--fold", "all", "--cases", *cases, "--images", *images,
            "--label-map", json.dumps(LABELS), "--postprocess", json.dumps(POSTPROCESS), "--output", str(out)]


def test_shard_cli_writes_every_case_and_its_confidence(tmp_path_factory, tmp_path):
    model = tn.trained_model(tmp_path_factory)
    cases = model["cases"][:2]
    out = tmp_path / "shards" / "0000"
    leftover = tmp_path / "shards" / ".0000.tmp"  # a killed attempt's temporary folder, with a stale case
    leftover.mkdir(parents=True)
    (leftover / "stale.nii.gz").write_bytes(b"")
    pl.main(_shard_argv(model, [c.case for c in cases], [c.image for c in cases], out))
    assert not (out / "stale.nii.gz").exists() and not leftover.exists()
    for case in cases:
        label_path, confidence_path = pl.case_files(out, case.case)
        image = sitk.ReadImage(case.image)
        for path in (label_path, confidence_path):
            written = sitk.ReadImage(path)
            assert written.GetPixelID() == sitk.sitkUInt8 and Geometry.of(written) == Geometry.of(image)
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label_path)))) <= {0, 1, 3}
    assert pd.read_csv(out / "efficiency.tsv", sep="\t")["Name"].tolist() == [c.case for c in cases]


def test_shard_with_a_bad_case_leaves_no_folder(tmp_path_factory, tmp_path):
    model = tn.trained_model(tmp_path_factory)
    out = tmp_path / "0000"
    argv = _shard_argv(model, ["ok", "missing"], [model["cases"][0].image, str(tmp_path / "missing_0000.nii.gz")],
                       out)
    with pytest.raises(SystemExit, match=r"missing.*missing_0000\.nii\.gz.*does not exist"):
        pl.main(argv)
    assert not out.exists()
    with pytest.raises(SystemExit, match="incomplete"):
        pl.main(_shard_argv({"model": tmp_path / "no_model"}, ["ok"], [model["cases"][0].image], out))
