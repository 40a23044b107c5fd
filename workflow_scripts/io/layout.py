"""Where cases live: discovery of a FLARE / nnU-Net raw layout and the fixed artifact paths under results/.

Case discovery runs when Snakemake parses the workflow, so it only lists directories (no image is opened): a
4,000-case dataset must plan in seconds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .volumes import CaseError, validate_case_id


@dataclass(frozen=True)
class Case:
    """One case of a dataset: its image and, when annotated, its label file."""

    case: str
    image: str
    label: str | None


def discover_cases(images_dir: str, labels_dir: str | None, image_suffix: str, label_suffix: str) -> list[Case]:
    """List ``<case><image_suffix>`` files in ``images_dir``, paired with ``<case><label_suffix>`` labels.

    A case without a label file is unlabeled. Labels without an image are an error: they usually mean a wrong
    suffix or a half-copied dataset, and silently dropping them would lose annotations.
    """
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"image folder {images_dir!r} does not exist (config key data.images / data.test_images)")
    cases: dict[str, str] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            if entry.name.endswith(image_suffix) and not entry.name.startswith("."):
                case = entry.name[: -len(image_suffix)]
                validate_case_id(case, entry.path)
                cases[case] = entry.path
    labels: dict[str, str] = {}
    if labels_dir and os.path.isdir(labels_dir):
        with os.scandir(labels_dir) as entries:
            for entry in entries:
                if entry.name.endswith(label_suffix) and not entry.name.startswith("."):
                    labels[entry.name[: -len(label_suffix)]] = entry.path
    orphans = sorted(set(labels) - set(cases))
    if orphans:
        raise CaseError(orphans[0], labels[orphans[0]], f"label without an image {images_dir}/{orphans[0]}{image_suffix}"
                        f" ({len(orphans)} such label files)")
    return [Case(case, cases[case], labels.get(case)) for case in sorted(cases)]


def new_scans(images_dir: str, image_suffix: str, name: str | None = None) -> tuple[str, dict[str, str]]:
    """The scans of the ``predict`` config section: its output name and case -> image file.

    The name (``predict.name``, by default the folder's own name) becomes the folder results/predict/<name>/, so
    it obeys the rules of case ids. A missing folder, a folder without any ``<case><image_suffix>`` file and an odd
    name stop planning with the config key named, before any job runs.
    """
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"scan folder {images_dir!r} does not exist (config key predict.images)")
    name = name or os.path.basename(os.path.normpath(images_dir))
    try:
        validate_case_id(name)
    except CaseError as err:
        raise ValueError(f"prediction name {name!r} (config key predict.name): {err.reason}") from None
    scans = {case.case: case.image for case in discover_cases(images_dir, None, image_suffix, "")}
    if not scans:
        raise FileNotFoundError(f"no scan named <case>{image_suffix} in {images_dir!r} (config keys "
                                f"predict.images, predict.image_suffix)")
    return name, scans


def demo_layout(results: str) -> dict[str, str]:
    """Folders of the embedded demo dataset, in the same shape as the ``data`` config section."""
    root = Path(results) / "demo"
    return {
        "images": str(root / "imagesTr"),
        "labels": str(root / "labelsTr"),
        "test_images": str(root / "imagesTs"),
        "test_labels": str(root / "labelsTs"),
        "image_suffix": "_0000.nii.gz",
        "label_suffix": ".nii.gz",
    }
