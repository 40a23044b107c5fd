"""Connected-component cleanup: organs keep their largest part, lesions keep every part above a size."""
from __future__ import annotations

import numpy as np

from workflow_scripts.labels.postprocess import ComponentRule, clean_components, rules_from_config

LABELS = [{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 2, "name": "Spleen", "kind": "organ"},
          {"id": 14, "name": "Lesion", "kind": "lesion"}]


def volume() -> np.ndarray:
    label = np.zeros((12, 12, 12), np.uint8)
    label[1:5, 1:5, 1:5] = 1  # 64 voxels, the liver's main part
    label[8:10, 8:10, 8:10] = 1  # 8-voxel island
    label[0, 11, 11] = 2
    label[6:8, 0:3, 0:3] = 14  # 18-voxel lesion
    label[10:12, 0:2, 9:11] = 14  # 8-voxel lesion
    label[11, 11, 0] = 14  # 1-voxel speck
    return label


def test_organ_keeps_largest_and_lesions_keep_all_above_size() -> None:
    rules = {1: ComponentRule(1, 0), 14: ComponentRule(0, 4.0)}
    cleaned = clean_components(volume(), (1.0, 1.0, 1.0), rules)
    assert (cleaned == 1).sum() == 64
    assert (cleaned == 14).sum() == 18 + 8, "both lesions above 4 mm³ stay, the speck goes"
    assert (cleaned == 2).sum() == 1, "a class without a rule is untouched"


def test_min_size_is_in_mm3_so_spacing_matters() -> None:
    rules = {14: ComponentRule(0, 20.0)}
    fine = clean_components(volume(), (1.0, 1.0, 1.0), rules)
    coarse = clean_components(volume(), (3.0, 1.0, 1.0), rules)
    assert (fine == 14).sum() == 0
    assert (coarse == 14).sum() == 18 + 8


def test_keep_k_largest_and_input_untouched() -> None:
    label = volume()
    before = label.copy()
    cleaned = clean_components(label, (1, 1, 1), {1: ComponentRule(2, 0)})
    assert (cleaned == 1).sum() == 72
    np.testing.assert_array_equal(label, before)


def test_empty_border_changes_nothing() -> None:
    """The cleanup works inside the foreground box: padding the volume with background must commute with it."""
    rules = {1: ComponentRule(1, 0), 2: ComponentRule(1, 0), 14: ComponentRule(0, 4.0)}
    pad = ((3, 1), (0, 5), (2, 2))
    padded = clean_components(np.pad(volume(), pad), (1, 1, 1), rules)
    np.testing.assert_array_equal(padded, np.pad(clean_components(volume(), (1, 1, 1), rules), pad))
    assert (padded == 1).sum() == 64 and (padded == 14).sum() == 26


def test_empty_volume() -> None:
    empty = np.zeros((4, 4, 4), np.uint8)
    np.testing.assert_array_equal(clean_components(empty, (1, 1, 1), {1: ComponentRule(1, 0)}), empty)


def test_rules_from_config_applies_kind_defaults_and_overrides() -> None:
    cfg = {"organ": {"keep_largest": 1, "min_size_mm3": 0}, "lesion": {"keep_largest": 0, "min_size_mm3": 10},
           "per_class": {"2": {"keep_largest": 2}}}
    rules = rules_from_config(cfg, LABELS)
    assert rules[1] == ComponentRule(1, 0.0)
    assert rules[2] == ComponentRule(2, 0.0)
    assert rules[14] == ComponentRule(0, 10.0)
