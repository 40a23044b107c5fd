"""Connected-component cleanup shared by pseudo-labelling and student inference.

Organs are single objects, so stray islands are false positives: keep the largest component(s). Lesions are often
multiple, so they keep every component above a minimum physical size. Sizes are in mm³ so one setting works for
any spacing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import cc3d
import numpy as np

from ..io.volumes import foreground_box


@dataclass(frozen=True)
class ComponentRule:
    keep_largest: int  # components kept per class, largest first; 0 keeps all
    min_size_mm3: float  # components smaller than this are removed


def rules_from_config(postprocess: Mapping, labels: Sequence[Mapping]) -> dict[int, ComponentRule]:
    """Per-class rules from the ``postprocess`` config section: organ/lesion defaults, then per-class overrides."""
    rules = {}
    for entry in labels:
        rule = dict(postprocess[entry["kind"]])
        rule.update(postprocess.get("per_class", {}).get(str(entry["id"]), {}))
        rules[entry["id"]] = ComponentRule(int(rule["keep_largest"]), float(rule["min_size_mm3"]))
    return rules


def clean_components(
    label: np.ndarray, spacing_zyx: Sequence[float], rules: Mapping[int, ComponentRule], connectivity: int = 26
) -> np.ndarray:
    """Return a copy of ``label`` with components removed per class rule; classes without a rule are untouched.

    One multi-label connected-components pass (cc3d) labels every class at once, so the cost does not grow with
    the number of classes, and it runs inside the foreground box only (no component leaves it): a FLARE-sized
    prediction fills a fraction of the volume.
    """
    box = foreground_box(label)
    cleaned = label.copy()
    if box is not None:
        _remove_components(cleaned[box], spacing_zyx, rules, connectivity)
    return cleaned


def _remove_components(label: np.ndarray, spacing_zyx: Sequence[float], rules: Mapping[int, ComponentRule],
                       connectivity: int) -> None:
    """Set the voxels of every component that a rule drops to 0, in place (``label`` may be a view)."""
    components = cc3d.connected_components(label, connectivity=connectivity, out_dtype=np.uint32)
    n = int(components.max())
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    # class of each component: any voxel of the component carries it
    component_class = np.zeros(n + 1, dtype=np.int64)
    component_class[components.ravel()] = label.ravel()
    voxel_mm3 = float(np.prod(spacing_zyx))
    keep = np.ones(n + 1, dtype=bool)
    keep[0] = True
    for cls, rule in rules.items():
        ids = np.flatnonzero(component_class == cls)
        ids = ids[ids > 0]
        if ids.size == 0:
            continue
        drop = sizes[ids] * voxel_mm3 < rule.min_size_mm3
        if rule.keep_largest > 0:
            order = np.argsort(-sizes[ids], kind="stable")
            ranked_out = np.ones(ids.size, dtype=bool)
            ranked_out[order[: rule.keep_largest]] = False
            drop |= ranked_out
        keep[ids[drop]] = False
    label[~keep[components]] = 0
