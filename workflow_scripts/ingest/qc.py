"""Ingest quality control: one case's image/label pair checked before anything downstream trusts it.

Every later stage assumes a 3D single-channel image with finite intensities and, for an annotated case, an
integer label map on the same voxel grid whose values all belong to the label map. Checking that once, per case,
turns a confusing failure deep inside nnU-Net into a message naming the case and the file. With
``on_error=skip`` a bad case is recorded as rejected instead, and the summary keeps it out of every later stage.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..io.label_map import add_label_map_argument
from ..io.volumes import (CaseError, Geometry, add_tolerance_arguments, read_label, read_volume, tolerances_from_args,
                          validate_case_id, write_text)


def geometry_record(geometry: Geometry) -> dict:
    """JSON-friendly geometry in SimpleITK's (x, y, z) order, as stored in the QC record."""
    return {
        "size": list(geometry.size),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
    }


def present_values(label: np.ndarray) -> list[int]:
    """Sorted distinct values of an integer array.

    ``np.bincount`` is a single linear pass, far cheaper than sorting (``np.unique``) on a 100-million-voxel
    volume, but it needs non-negative values of modest size; anything else (garbage labels) falls back to unique.
    """
    low, high = int(label.min()), int(label.max())
    if low >= 0 and high < 2**16:
        return np.flatnonzero(np.bincount(label.ravel(), minlength=high + 1)).tolist()
    return np.unique(label).tolist()


def verify_gzip(path: str, case: str) -> None:
    """Decompress a ``.gz`` file to its end, checking the stream's CRC and length.

    ITK's NIfTI reader silently returns a volume from a truncated ``.nii.gz`` (the missing voxels are just
    absent), so a half-copied file would otherwise pass as valid data.
    """
    if not str(path).endswith(".gz") or not Path(path).is_file():
        return  # other formats, and missing files, are reported by the reader itself
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as err:
        raise CaseError(case, path, f"corrupt gzip data: {err}") from err


def count_nonfinite(path: str, array: np.ndarray) -> int:
    """Number of NaN or infinite voxels of an image as stored in its file.

    ITK's NIfTI reader (SimpleITK 2.5) silently turns NaN and +-inf into 0, so ``array`` cannot show them for a
    NIfTI file: its stored voxels are read again with nibabel. Integer images (most CT) cannot hold either value,
    so nibabel is imported only when needed, keeping start-up short for the thousands of QC jobs.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    if str(path).endswith((".nii", ".nii.gz")):
        import nibabel

        array = np.asanyarray(nibabel.load(path).dataobj)
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _check_image(case: str, path: str) -> tuple[dict, Geometry, list[CaseError]]:
    """Read the image (CaseError when unusable) and list its non-fatal problems."""
    verify_gzip(path, case)
    array, geometry = read_volume(path, case)
    problems = []
    record = {"file": str(path), "dtype": str(array.dtype), **geometry_record(geometry)}
    n_bad = count_nonfinite(path, array)
    if n_bad:
        problems.append(CaseError(case, path, f"image has {n_bad} NaN or infinite voxel(s)"))
    else:
        record["min"], record["max"] = float(array.min()), float(array.max())
    return record, geometry, problems


def _check_label(
    case: str, path: str, image_geometry: Geometry, label_ids: Sequence[int], tolerances: Mapping[str, float]
) -> tuple[dict, list[CaseError]]:
    """Read the label map (CaseError when unusable) and list its problems against the image and the label map."""
    verify_gzip(path, case)
    array, geometry = read_label(path, case)
    problems = []
    mismatch = image_geometry.mismatch(geometry, **tolerances)
    if mismatch:
        problems.append(CaseError(case, path, f"label does not match the image's voxel grid: image {mismatch}"))
    values = present_values(array)
    unknown = sorted(set(values) - {0, *label_ids})
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
        problems.append(
            CaseError(case, path, f"label values not in the label map (0, {', '.join(map(str, label_ids))}): {shown}")
        )
    record = {"file": str(path), "dtype": str(array.dtype), "values": values, **geometry_record(geometry)}
    return record, problems


def check_case(
    case: str, image: str, label: str | None, label_ids: Sequence[int], tolerances: Mapping[str, float]
) -> tuple[dict, list[CaseError]]:
    """QC record of one case and every problem found.

    Problems that make the rest meaningless (bad id, unreadable or non-3D file) end the check early; independent
    ones (non-finite intensities, geometry, label values) are all collected so one run reports them together.
    """
    record: dict = {"case": case, "has_label": label is not None, "image": None, "label": None}
    problems: list[CaseError] = []
    try:
        validate_case_id(case, image)
        record["image"], geometry, image_problems = _check_image(case, image)
        problems += image_problems
        if label is not None:
            record["label"], label_problems = _check_label(case, label, geometry, label_ids, tolerances)
            problems += label_problems
    except CaseError as err:
        problems.append(err)
    record["status"] = "rejected" if problems else "ok"
    record["reasons"] = [err.reason for err in problems]
    record["problems"] = [{"file": err.path, "reason": err.reason} for err in problems]
    return record, problems


def summarize(records: Sequence[Mapping]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accepted cases (case, has_label) and one rejected row per problem (case, file, reason), in case order."""
    records = sorted(records, key=lambda r: r["case"])
    accepted = pd.DataFrame(
        [(r["case"], r["has_label"]) for r in records if r["status"] == "ok"], columns=["case", "has_label"]
    )
    rejected = pd.DataFrame(
        [(r["case"], p["file"], p["reason"]) for r in records if r["status"] != "ok" for p in r["problems"]],
        columns=["case", "file", "reason"],
    )
    return accepted, rejected


def _case_command(args: argparse.Namespace) -> int:
    label_ids = sorted(int(entry["id"]) for entry in args.label_map)
    record, problems = check_case(args.case, args.image, args.label, label_ids, tolerances_from_args(args))
    for err in problems:
        print(f"QC: {err}", file=sys.stderr)
    if problems and args.on_error == "fail":
        print("QC failed (qc.on_error=fail; set it to skip to exclude bad cases instead)", file=sys.stderr)
        return 1
    write_text(args.output, json.dumps(record, indent=1) + "\n")
    print(f"QC {args.case}: {record['status']}")
    return 0


def _summary_command(args: argparse.Namespace) -> int:
    records = [json.loads(Path(path).read_text()) for path in args.records]
    accepted, rejected = summarize(records)
    print(f"QC: {len(accepted)} case(s) accepted ({int(accepted['has_label'].sum())} labelled), "
          f"{rejected['case'].nunique()} rejected")
    for row in rejected.itertuples():
        print(f"rejected {row.case} ({row.file}): {row.reason}")
    if accepted.empty:
        print("QC: no case passed QC; nothing can be trained", file=sys.stderr)
        return 1
    write_text(args.rejected, rejected.to_csv(sep="\t", index=False))
    write_text(args.accepted, accepted.to_csv(sep="\t", index=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    case = commands.add_parser("case", help="check one case and write its QC record (JSON)")
    case.add_argument("--case", required=True)
    case.add_argument("--image", required=True)
    case.add_argument("--label", help="label file; leave out for an unlabeled case")
    add_label_map_argument(case)
    case.add_argument("--on-error", choices=["fail", "skip"], required=True)
    add_tolerance_arguments(case)
    case.add_argument("--output", required=True)
    case.set_defaults(run=_case_command)
    summary = commands.add_parser("summary", help="collect QC records into accepted.tsv and rejected.tsv")
    summary.add_argument("--accepted", required=True)
    summary.add_argument("--rejected", required=True)
    summary.add_argument("records", nargs="+", help="QC records (JSON) of every case")
    summary.set_defaults(run=_summary_command)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
