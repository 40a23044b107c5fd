"""The embedded synthetic FLARE23-like dataset: CT-like volumes, complete truth, and FLARE's mix of weak labels.

Every later stage needs realistic input without downloading 4,000 scans, so this module writes a stand-in with
the same conventions: ``imagesTr/<case>_0000.nii.gz`` (int16 HU), ``labelsTr/<case>.nii.gz`` (uint8, only for
annotated cases, holding only the classes the case's annotation kind covers), ``truthTr/<case>.nii.gz`` (the
complete truth, so pseudo-labels can be scored), ``imagesTs``/``labelsTs`` (complete labels) and ``dataset.json``.
Shapes come from :mod:`workflow_scripts.demo.anatomy`; this module turns them into intensities and annotations.

Every random draw of a case derives from (seed, case id) through independent streams, so a case does not depend
on the other cases, on the order or the number of worker processes, or on n_train. (Only a lesion-only case is
forced to hold at least one lesion: its lesion count is max(draw, 1).)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from .anatomy import AIR, Anatomy, SmoothField, draw_anatomy, sample_frame
from .plan import dataset_json_path, plan, truth_path
from ..io.layout import demo_layout
from ..io.volumes import CaseError, Geometry, write_text, write_volume

# The 13 FLARE23 organs the generator can draw, by label name (the config's label map gives their ids).
FLARE_ORGANS = ("Liver", "RK", "Spleen", "Pancreas", "Aorta", "IVC", "RAG", "LAG", "Gallbladder", "Esophagus",
                "Stomach", "Duodenum", "LK")
# Mean HU per background tissue code of demo_anatomy (air, fat, muscle, cortical bone, marrow, disc, CSF, lung,
# bowel, bowel gas).
TISSUE_HU = np.array([-1000, -100, 50, 850, 380, 90, 10, -850, 30, -900], dtype=np.float32)
# Portal-venous-like organ means: distinct enough to be learnable, within CT's soft-tissue range except the
# enhancing kidneys and the contrast-filled vessels (scaled per case by the contrast timing).
ORGAN_HU = {"Liver": 60, "RK": 120, "Spleen": 50, "Pancreas": 40, "Aorta": 200, "IVC": 150, "RAG": 30, "LAG": 30,
            "Gallbladder": 8, "Esophagus": 45, "Stomach": 25, "Duodenum": 35, "LK": 120}
VESSELS = ("Aorta", "IVC")
TEST_KIND = "test"  # test cases: complete labels, at least one lesion


@dataclass(frozen=True)
class DemoParams:
    """The ``demo`` config section, checked beyond what the schema can express."""

    seed: int
    shape: tuple[int, int, int]
    shape_jitter: float
    extent_z: tuple[float, float]
    extent_xy: tuple[float, float]
    max_lesions: int
    lesion_radius_mm: tuple[float, float]
    deformation_mm: float
    noise_hu: tuple[float, float]
    partial_annotations: tuple[tuple[str, ...], ...] | None  # organ-name sets of partial cases; None: random

    @classmethod
    def from_config(cls, demo: Mapping) -> "DemoParams":
        ranges = {"demo.extent_mm.z": demo["extent_mm"]["z"], "demo.extent_mm.xy": demo["extent_mm"]["xy"],
                  "demo.lesion_radius_mm": demo["lesion_radius_mm"], "demo.noise_hu": demo["noise_hu"]}
        for key, (low, high) in ranges.items():
            if low > high:
                raise ValueError(f"{key} must be [low, high], got {[low, high]}")
        for group in demo["partial_annotations"] or []:
            unknown = sorted(set(group) - set(FLARE_ORGANS))
            if unknown:
                raise ValueError(f"demo.partial_annotations: {unknown} are not organs the demo draws "
                                 f"{list(FLARE_ORGANS)}")
            if set(group) == set(FLARE_ORGANS):
                raise ValueError(f"demo.partial_annotations: {list(group)} holds every organ; that is a strong case")
        return cls(int(demo["seed"]), tuple(demo["shape"]), float(demo["shape_jitter"]),
                   tuple(demo["extent_mm"]["z"]), tuple(demo["extent_mm"]["xy"]), int(demo["max_lesions"]),
                   tuple(demo["lesion_radius_mm"]), float(demo["deformation_mm"]), tuple(demo["noise_hu"]),
                   None if demo["partial_annotations"] is None
                   else tuple(tuple(names) for names in demo["partial_annotations"]))


def flare_ids(labels: Sequence[Mapping]) -> tuple[dict[str, int], int]:
    """Organ name -> id and the lesion id from the config's label map, which must be FLARE23's (any ids)."""
    organs = {entry["name"]: entry["id"] for entry in labels if entry["kind"] == "organ"}
    lesions = [entry["id"] for entry in labels if entry["kind"] == "lesion"]
    missing = sorted(set(FLARE_ORGANS) - set(organs))
    unknown = sorted(set(organs) - set(FLARE_ORGANS))
    if missing or unknown or len(lesions) != 1:
        raise ValueError(
            f"the demo draws the 13 FLARE23 organs {list(FLARE_ORGANS)} and one lesion class; the label map lacks "
            f"{missing}, has organs it cannot draw {unknown} and {len(lesions)} lesion classes"
        )
    return organs, lesions[0]


def case_streams(seed: int, case: str) -> list[np.random.Generator]:
    """Independent generators for anatomy, lesion intensities, image intensities and annotation of one case."""
    key = int.from_bytes(hashlib.sha256(case.encode()).digest()[:8], "little")
    return [np.random.default_rng(s) for s in np.random.SeedSequence([seed, key]).spawn(4)]


def render_image(rng: np.random.Generator, lesion_rng: np.random.Generator, anatomy: Anatomy,
                 organ_ids: Mapping[str, int], noise_hu: Sequence[float]) -> np.ndarray:
    """CT-like int16 HU: per-tissue means (jittered per case), partial-volume blur, smooth bias and texture inside
    the body, Gaussian noise; lesions get their host's mean shifted darker (70 %) or brighter."""
    contrast = rng.uniform(0.8, 1.15)
    organ_hu = {name: (ORGAN_HU[name] + rng.normal(0, 5)) * (contrast if name in VESSELS else 1.0)
                for name in ORGAN_HU}
    lut = np.zeros(256, dtype=np.float32)
    for name, i in organ_ids.items():
        lut[i] = organ_hu[name]
    organ = anatomy.label > 0
    mean = TISSUE_HU[anatomy.tissue]
    mean[organ] = lut[anatomy.label[organ]]
    for lesion in anatomy.lesions:
        delta = -lesion_rng.uniform(25, 55) if lesion_rng.random() < 0.7 else lesion_rng.uniform(25, 45)
        mean[lesion.box][lesion.mask] = organ_hu[lesion.host] + delta
    image = ndimage.gaussian_filter(mean, sigma=0.6)
    texture = ndimage.gaussian_filter(rng.standard_normal(mean.shape, dtype=np.float32), sigma=1.0)
    texture *= np.float32(rng.uniform(4, 8) / texture.std())
    bias = SmoothField.sample(rng, rng.uniform(5, 15), (150, 400))(anatomy.frame.axes())
    body = organ | (anatomy.tissue != AIR)
    image += np.where(body, texture + bias, np.float32(0))
    image += rng.standard_normal(mean.shape, dtype=np.float32) * np.float32(rng.uniform(*noise_hu))
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def partial_organ_sets(names: Sequence[Sequence[str]] | None, organ_ids: Mapping[str, int]) -> list[list[int]] | None:
    """Organ ids of each configured partial annotation (``demo.partial_annotations``, names checked by
    :meth:`DemoParams.from_config`); None stays None (uniform random subsets)."""
    return None if names is None else [sorted(organ_ids[name] for name in group) for group in names]


def annotated_classes(kind: str, rng: np.random.Generator, organ_ids: Mapping[str, int], lesion_id: int,
                      has_lesion: bool, partial_sets: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Classes an annotation of ``kind`` covers (FLARE23: strong = all organs, lesion_only = the lesion, partial =
    one of ``partial_sets`` drawn uniformly, or a random non-empty proper subset of organs when it is None; the
    lesion wherever the case has one; unlabeled = nothing).

    Which organs partial cases carry decides how often a small organ is called background in the raw labels, and
    so how well a model trained on them (the paper's baseline) can learn it: FLARE23's partial labels come from
    single-organ datasets, the uniform subsets annotate every organ in about half the partial cases."""
    organs = sorted(organ_ids.values())
    lesion = [lesion_id] if has_lesion else []
    if kind in ("strong", TEST_KIND):
        return organs + lesion
    if kind == "lesion_only":
        return [lesion_id]
    if kind == "partial":
        if partial_sets is None:
            subset = rng.choice(organs, size=rng.integers(1, len(organs)), replace=False)
        else:
            subset = partial_sets[int(rng.integers(len(partial_sets)))]
        return sorted(int(i) for i in subset) + lesion
    if kind == "unlabeled":
        return []
    raise ValueError(f"unknown annotation kind {kind!r}")


@dataclass
class SyntheticCase:
    case: str
    kind: str
    image: np.ndarray  # int16 HU (z, y, x)
    truth: np.ndarray  # uint8, every class
    classes: list[int]  # classes the written label holds (empty: no label file)
    geometry: Geometry
    anatomy: Anatomy

    @property
    def label(self) -> np.ndarray | None:
        """The annotation as written: the truth restricted to the annotated classes, background elsewhere."""
        if not self.classes:
            return None
        return np.where(np.isin(self.truth, self.classes), self.truth, 0).astype(np.uint8)


def generate_case(case: str, kind: str, params: DemoParams, organ_ids: Mapping[str, int],
                  lesion_id: int) -> SyntheticCase:
    """Draw one case of annotation ``kind`` (a demo_plan kind or ``test``) from (seed, case id) alone."""
    anatomy_rng, lesion_rng, intensity_rng, annotation_rng = case_streams(params.seed, case)
    frame = sample_frame(anatomy_rng, params.shape, params.shape_jitter, params.extent_z, params.extent_xy)
    n_lesions = int(anatomy_rng.integers(0, params.max_lesions + 1))
    if kind in ("lesion_only", TEST_KIND):
        n_lesions = max(n_lesions, 1)
    try:
        anatomy = draw_anatomy(anatomy_rng, frame, organ_ids, lesion_id, n_lesions, params.lesion_radius_mm,
                               params.deformation_mm)
    except RuntimeError as err:
        raise CaseError(case, None, f"cannot draw the synthetic anatomy: {err}") from err
    image = render_image(intensity_rng, lesion_rng, anatomy, organ_ids, params.noise_hu)
    geometry = Geometry(
        size=tuple(int(n) for n in reversed(frame.shape)),
        spacing=tuple(float(s) for s in reversed(frame.spacing)),
        origin=tuple(float(o) for o in reversed(frame.origin)),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )
    classes = annotated_classes(kind, annotation_rng, organ_ids, lesion_id, bool(anatomy.lesions),
                                partial_organ_sets(params.partial_annotations, organ_ids))
    return SyntheticCase(case, kind, image, anatomy.label, classes, geometry, anatomy)


def case_files(results: str, case: str, kind: str) -> dict[str, str]:
    """Where a case's files go (the layout common.smk expects); unlabeled cases have no label file."""
    layout = demo_layout(results)
    image, label = case + layout["image_suffix"], case + layout["label_suffix"]
    if kind == TEST_KIND:
        return {"image": os.path.join(layout["test_images"], image),
                "label": os.path.join(layout["test_labels"], label)}
    files = {"image": os.path.join(layout["images"], image), "truth": truth_path(results, case)}
    if kind != "unlabeled":
        files["label"] = os.path.join(layout["labels"], label)
    return files


def make_case(job: tuple[str, str], params: DemoParams, organ_ids: Mapping[str, int], lesion_id: int,
              results: str) -> dict:
    """Generate and write one case (atomically); return its dataset.json entry."""
    case, kind = job
    start = time.perf_counter()
    synthetic = generate_case(case, kind, params, organ_ids, lesion_id)
    files = case_files(results, case, kind)
    write_volume(files["image"], synthetic.image, synthetic.geometry)
    if "truth" in files:
        write_volume(files["truth"], synthetic.truth, synthetic.geometry)
    if "label" in files:
        write_volume(files["label"], synthetic.label, synthetic.geometry)
    root = Path(dataset_json_path(results)).parent
    return {
        "case": case,
        "kind": kind,
        "annotated": synthetic.classes,
        "lesions": len(synthetic.anatomy.lesions),
        "shape_zyx": list(synthetic.image.shape),
        "spacing_zyx": [round(s, 4) for s in reversed(synthetic.geometry.spacing)],
        "files": {key: Path(path).relative_to(root).as_posix() for key, path in files.items()},
        "seconds": round(time.perf_counter() - start, 2),
    }


def _make_case_pooled(job: tuple[str, str], **kwargs) -> dict | tuple[str, str | None, str]:
    """:func:`make_case` for a worker process: a CaseError comes back as (case, path, reason), because the
    exception itself does not survive pickling (its constructor takes three arguments)."""
    try:
        return make_case(job, **kwargs)
    except CaseError as err:
        return err.case, err.path, err.reason


def generate_dataset(demo: Mapping, labels: Sequence[Mapping], results: str, threads: int = 1) -> dict:
    """Write every case of the demo plan under ``results``/demo and then ``dataset.json`` (written last, so its
    presence means the dataset is complete); return the dataset.json content."""
    params = DemoParams.from_config(demo)
    organ_ids, lesion_id = flare_ids(labels)
    demo_plan = plan(demo)
    jobs = [*demo_plan.train.items(), *((case, TEST_KIND) for case in demo_plan.test)]
    kwargs = {"params": params, "organ_ids": organ_ids, "lesion_id": lesion_id, "results": results}
    if threads > 1:
        with ProcessPoolExecutor(max_workers=min(threads, len(jobs))) as pool:
            records = list(pool.map(partial(_make_case_pooled, **kwargs), jobs))
        for failed in (r for r in records if isinstance(r, tuple)):
            raise CaseError(*failed)
    else:
        records = [make_case(job, **kwargs) for job in jobs]
    train = [r for r in records if r["kind"] != TEST_KIND]
    dataset = {
        "name": "FLARE23-like synthetic demo",
        "description": "synthetic abdominal CT from workflow_scripts.demo.dataset (FLARE23 label conventions)",
        "seed": params.seed,
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{entry["name"]: entry["id"] for entry in labels}},
        "numTraining": len(train),
        "numTest": len(records) - len(train),
        "file_ending": ".nii.gz",
        "annotation": {r["case"]: r["kind"] for r in train},
        "cases": records,
    }
    write_text(dataset_json_path(results), json.dumps(dataset, indent=1) + "\n")
    return dataset


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help='JSON {"demo": <config demo>, "labels": <config labels>}')
    parser.add_argument("--dataset-json", required=True,
                        help="<results>/demo/dataset.json; the dataset is written around it in the demo layout")
    parser.add_argument("--threads", type=int, default=1, help="worker processes (one case each at a time)")
    args = parser.parse_args(argv)
    results = str(Path(args.dataset_json).parent.parent)
    if Path(dataset_json_path(results)) != Path(args.dataset_json):
        parser.error(f"--dataset-json must be <results>/demo/dataset.json, got {args.dataset_json}")
    spec = json.loads(args.spec)
    start = time.perf_counter()
    dataset = generate_dataset(spec["demo"], spec["labels"], results, args.threads)
    for record in dataset["cases"]:
        print(f"{record['case']}\t{record['kind']}\tshape {record['shape_zyx']}\tspacing {record['spacing_zyx']}"
              f"\tlesions {record['lesions']}\tannotated {record['annotated']}\t{record['seconds']} s")
    print(f"{len(dataset['cases'])} cases in {time.perf_counter() - start:.1f} s with {args.threads} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
