"""Building an nnU-Net v2 raw dataset (imagesTr/, labelsTr/, dataset.json) from workflow cases.

nnU-Net wants consecutive label ids 0..K, while the workflow's label map keeps FLARE's ids and a model may learn any
subset of them (``teacher.classes``; lesions excluded by default). So every class the model learns gets the next
nnU-Net id in ascending order of its original id, every other label becomes background, and dataset.json records the
mapping (key ``workflow_label_ids``) so predictions can be mapped back without the workflow config.

Images are symlinks to the originals: the raw data stays read-only and a 4,000-case dataset is not copied. Labels
are symlinks where the file can be used as is (its values already are nnU-Net ids); otherwise they are rewritten with
the remapped ids, with the label's own geometry.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..io.label_map import add_label_map_argument, label_names
from ..io.manifest import TrainingCase
from ..io.volumes import CaseError, read_label, validate_case_id, write_text, write_volume

LABEL_IDS_KEY = "workflow_label_ids"
CHANNEL_NAME = "CT"  # selects nnU-Net's CT normalisation (global foreground percentiles)


def dataset_name(dataset_id: int, name: str) -> str:
    """nnU-Net's folder name for a dataset id, e.g. Dataset901_Teacher."""
    return f"Dataset{dataset_id:03d}_{name}"


def label_mapping(classes: Sequence[int]) -> dict[int, int]:
    """Original label id -> consecutive nnU-Net id (1..K, in ascending original id)."""
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {list(classes)}")
    return {original: index + 1 for index, original in enumerate(sorted(classes))}


def remap_table(mapping: Mapping[int, int], max_value: int) -> np.ndarray:
    """Lookup table for ``table[label]``: mapped classes get their new id, every other value becomes 0."""
    table = np.zeros(max(max_value, *mapping) + 1, dtype=np.uint8)
    for original, new in mapping.items():
        table[original] = new
    return table


def file_ending(path: str) -> str:
    """The file type suffix nnU-Net matches on (``.nii.gz`` counts as one suffix)."""
    name = os.path.basename(path)
    for double in (".nii.gz", ".nrrd.gz"):
        if name.endswith(double):
            return double
    suffix = Path(name).suffix
    if not suffix:
        raise ValueError(f"cannot tell the file type of {path!r}: no suffix")
    return suffix


def _link(source: str, target: Path) -> None:
    """Absolute symlink, so the dataset stays valid whatever the working directory of a later job."""
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(os.path.abspath(source))


def add_case(case: TrainingCase, root: Path, mapping: Mapping[int, int], known_ids: set[int], ending: str) -> bool:
    """Put one case into the dataset; returns True when its label had to be rewritten.

    Every label value must be 0 or an id of the label map: an unknown value means a wrong label file, and mapping it
    silently to background would hide that.
    """
    validate_case_id(case.case, case.image)
    if file_ending(case.image) != ending:
        raise CaseError(case.case, case.image, f"image type differs from the dataset's ({ending}); convert it first")
    _link(case.image, root / "imagesTr" / f"{case.case}_0000{ending}")
    label, geometry = read_label(case.label, case.case)
    values = np.unique(label)
    unknown = sorted(set(values.tolist()) - known_ids - {0})
    if unknown:
        raise CaseError(case.case, case.label, f"label values {unknown} are not in the label map")
    target = root / "labelsTr" / f"{case.case}{ending}"
    usable_as_is = all(v == 0 or mapping.get(int(v)) == v for v in values.tolist()) and file_ending(case.label) == ending
    if usable_as_is:
        _link(case.label, target)
        return False
    write_volume(target, remap_table(mapping, int(values.max()))[label], geometry)
    return True


def build_dataset(cases: Sequence[TrainingCase], root: str | os.PathLike, classes: Sequence[int],
                  label_names: Mapping[int, str]) -> dict:
    """Write an nnU-Net raw dataset for ``cases`` learning ``classes`` into ``root`` and return its dataset.json.

    The folder is rebuilt from scratch (it holds only links and remapped labels): nnU-Net trains on whatever
    imagesTr/ holds, so a case that left the split must not linger. dataset.json is written last, so a folder
    without it is an unfinished conversion.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not cases:
        raise ValueError("no training cases: the split has no case with all the required classes")
    missing = sorted(set(classes) - set(label_names))
    if missing:
        raise ValueError(f"classes {missing} are not in the label map")
    root = Path(root)
    (root / "dataset.json").unlink(missing_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    mapping = label_mapping(classes)
    ending = file_ending(cases[0].image)
    rewritten = [add_case(case, root, mapping, set(label_names), ending) for case in cases]
    labels = {"background": 0, **{label_names[original]: new for original, new in mapping.items()}}
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # nnU-Net writes in place; we move it in atomically
        generate_dataset_json(tmp, {0: CHANNEL_NAME}, labels, len(cases), ending, dataset_name=root.name,
                              **{LABEL_IDS_KEY: {str(new): original for original, new in mapping.items()},
                                 "labels_rewritten": int(sum(rewritten))})
        text = Path(tmp, "dataset.json").read_text()
    write_text(root / "dataset.json", text)
    return json.loads(text)


def label_ids_of(dataset_json: Mapping) -> dict[int, int]:
    """nnU-Net id -> original id from a dataset.json; identity for datasets not built here."""
    stored = dataset_json.get(LABEL_IDS_KEY)
    if stored is None:
        return {int(v): int(v) for v in dataset_json["labels"].values() if int(v) > 0}
    return {int(k): int(v) for k, v in stored.items()}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflow_scripts.nnunet.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", required=True, help="case ids")
    parser.add_argument("--images", nargs="+", required=True, help="image files, in the order of --cases")
    parser.add_argument("--labels", nargs="+", required=True, help="label files, in the order of --cases")
    parser.add_argument("--classes", type=int, nargs="+", required=True, help="label ids the model learns")
    add_label_map_argument(parser)
    parser.add_argument("--output", required=True, help="dataset folder, e.g. .../raw/Dataset901_Teacher")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if not len(args.cases) == len(args.images) == len(args.labels):
        raise SystemExit("--cases, --images and --labels must have the same length")
    cases = [TrainingCase(*fields) for fields in zip(args.cases, args.images, args.labels)]
    dataset = build_dataset(cases, args.output, args.classes, label_names(args.label_map))
    print(f"{args.output}: {dataset['numTraining']} cases, labels {dataset['labels']}, "
          f"{dataset['labels_rewritten']} label files rewritten (the rest are symlinks)")


if __name__ == "__main__":
    main()
