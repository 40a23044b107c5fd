"""Case discovery of a raw layout and the demo's case plan."""
from __future__ import annotations

from pathlib import Path

import pytest

from workflow_scripts.demo.plan import kind_counts, plan
from workflow_scripts.io.layout import discover_cases, new_scans
from workflow_scripts.io.volumes import CaseError


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_discovery_pairs_images_and_labels(tmp_path: Path) -> None:
    for case in ["b", "a", "c"]:
        touch(tmp_path / "img" / f"{case}_0000.nii.gz")
    touch(tmp_path / "lab" / "a.nii.gz")
    touch(tmp_path / "lab" / "c.nii.gz")
    touch(tmp_path / "img" / "notes.txt")
    cases = discover_cases(str(tmp_path / "img"), str(tmp_path / "lab"), "_0000.nii.gz", ".nii.gz")
    assert [c.case for c in cases] == ["a", "b", "c"]
    assert cases[1].label is None and cases[0].label.endswith("lab/a.nii.gz")


def test_label_without_image_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path / "img" / "a_0000.nii.gz")
    touch(tmp_path / "lab" / "zz.nii.gz")
    with pytest.raises(CaseError, match=r"case 'zz'.*label without an image"):
        discover_cases(str(tmp_path / "img"), str(tmp_path / "lab"), "_0000.nii.gz", ".nii.gz")


def test_odd_case_id_is_rejected_at_discovery(tmp_path: Path) -> None:
    touch(tmp_path / "img" / "bad case_0000.nii.gz")
    with pytest.raises(CaseError, match="invalid case id"):
        discover_cases(str(tmp_path / "img"), None, "_0000.nii.gz", ".nii.gz")


def test_missing_image_folder_names_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.images"):
        discover_cases(str(tmp_path / "none"), None, "_0000.nii.gz", ".nii.gz")


def test_new_scans_are_named_after_their_folder_unless_a_name_is_given(tmp_path: Path) -> None:
    for case in ["b", "a"]:
        touch(tmp_path / "scans2024" / f"{case}_0000.nii.gz")
    touch(tmp_path / "scans2024" / "a.nii.gz")  # no label folder here: not a scan, not an error
    name, scans = new_scans(str(tmp_path / "scans2024") + "/", "_0000.nii.gz")
    assert name == "scans2024" and list(scans) == ["a", "b"]
    assert scans["a"].endswith("scans2024/a_0000.nii.gz")
    assert new_scans(str(tmp_path / "scans2024"), "_0000.nii.gz", "batch_1")[0] == "batch_1"


def test_new_scans_name_the_config_key_of_each_mistake(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="predict.images"):
        new_scans(str(tmp_path / "nowhere"), "_0000.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="predict.image_suffix"):
        new_scans(str(tmp_path / "empty"), "_0000.nii.gz")
    touch(tmp_path / "my scans" / "a_0000.nii.gz")
    with pytest.raises(ValueError, match="predict.name"):
        new_scans(str(tmp_path / "my scans"), "_0000.nii.gz")


@pytest.mark.parametrize("n", [1, 7, 10, 2200])
def test_kind_counts_add_up(n: int) -> None:
    fractions = {"strong": 0.1, "lesion_only": 0.4, "partial": 0.05, "unlabeled": 0.45}
    counts = kind_counts(n, fractions)
    assert sum(counts.values()) == n
    for kind, fraction in fractions.items():
        assert abs(counts[kind] - n * fraction) < 1


def test_kind_counts_reject_fractions_not_summing_to_one() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        kind_counts(10, {"strong": 0.5, "lesion_only": 0.1, "partial": 0.1, "unlabeled": 0.1})


def test_plan_is_deterministic_and_seed_dependent() -> None:
    cfg = {"n_train": 40, "n_test": 3, "seed": 1,
           "completeness": {"strong": 0.25, "lesion_only": 0.25, "partial": 0.25, "unlabeled": 0.25}}
    first, again = plan(cfg), plan(cfg)
    assert first == again
    assert plan({**cfg, "seed": 2}).train != first.train
    assert first.test == ["FLARE23Ts_0001", "FLARE23Ts_0002", "FLARE23Ts_0003"]
    assert sorted(first.train.values()).count("strong") == 10
    assert len(first.labelled) == 30
