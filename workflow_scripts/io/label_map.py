"""The label map: the config's ``labels`` list (``id``, ``name``, ``kind`` organ|lesion, evaluation keys per class).

Every CLI takes it the same way, as ``--label-map '<JSON of config labels>'`` (:func:`add_label_map_argument`), and
every stage derives class names, kinds and the nnU-Net ignore label from it here.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

KINDS = ("organ", "lesion")


@dataclass(frozen=True)
class LabelClass:
    id: int
    name: str
    kind: str  # "organ" or "lesion"


def parse_label_map(text: str) -> list[dict]:
    """The label map from its JSON command-line form; every entry needs an integer id, a name and a kind."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"label map is not JSON ({err}): {text[:80]!r}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError("label map must be a non-empty JSON list of {id, name, kind} entries (config key labels)")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry \
                or entry.get("kind") not in KINDS:
            raise ValueError(f"label map entry {entry!r} needs an integer id, a name and a kind organ|lesion")
    return entries


def add_label_map_argument(parser: argparse.ArgumentParser) -> None:
    """``--label-map``: the config's ``labels`` as JSON, parsed into its list of entries."""
    parser.add_argument("--label-map", required=True, type=parse_label_map, metavar="JSON",
                        help="the label map as JSON (config key labels)")


def label_classes(entries: Sequence[Mapping]) -> dict[int, LabelClass]:
    """Classes by id."""
    return {int(e["id"]): LabelClass(int(e["id"]), str(e["name"]), str(e["kind"])) for e in entries}


def label_names(entries: Sequence[Mapping]) -> dict[int, str]:
    """Class name by id."""
    return {int(e["id"]): str(e["name"]) for e in entries}


def ignore_label(entries: Sequence[Mapping]) -> int:
    """The nnU-Net ignore label: one above the highest label id (15 for FLARE23's ids 1-14).

    nnU-Net v2 requires the ignore label to be the highest value in the label map, so it cannot collide with a
    class and the merge and both student stages derive it from the same label map.
    """
    return max(int(entry["id"]) for entry in entries) + 1
