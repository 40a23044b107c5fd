"""The synthetic FLARE23-like demo dataset: labels agree with the generator's truth, the annotation mix follows the
config, anatomy and intensities are plausible, geometry is consistent, and every byte is reproducible."""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage
from snakemake.utils import validate

from conftest import REPO, TINY_CONFIG, run_workflow
from workflow_scripts.demo import anatomy as demo_anatomy
from workflow_scripts.demo.dataset import (DemoParams, annotated_classes, case_files, flare_ids, generate_case,
                                           generate_dataset, main, partial_organ_sets)
from workflow_scripts.demo.plan import KINDS, dataset_json_path, kind_counts, plan, truth_path
from workflow_scripts.io.volumes import CaseError, read_label, read_volume

SCHEMA = REPO / "config" / "schema.yaml"


def load_config(path: Path = TINY_CONFIG, **demo: object) -> dict:
    """A config file with demo overrides and the schema's defaults filled in, as the workflow sees it."""
    config = yaml.safe_load(path.read_text())
    config["demo"].update(demo)
    validate(config, str(SCHEMA), set_default=True)
    return config


def spec_json(config: dict) -> str:
    return json.dumps({"demo": config["demo"], "labels": config["labels"]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path, dict]:
    """The tiny config's dataset, written once through the CLI with two worker processes."""
    config = load_config()
    results = tmp_path_factory.mktemp("demo")
    dataset_json = dataset_json_path(str(results))
    assert main(["--spec", spec_json(config), "--dataset-json", dataset_json, "--threads", "2"]) == 0
    dataset = json.loads(Path(dataset_json).read_text())
    return config, results, dataset


def ids(config: dict) -> tuple[dict[str, int], int]:
    return flare_ids(config["labels"])


def test_kind_counts_follow_the_configured_fractions() -> None:
    for n, fractions in [(10, {"strong": 0.3, "lesion_only": 0.3, "partial": 0.2, "unlabeled": 0.2}),
                         (4000, {"strong": 0.0555, "lesion_only": 0.222, "partial": 0.2725, "unlabeled": 0.45}),
                         (7, {"strong": 0.25, "lesion_only": 0.25, "partial": 0.25, "unlabeled": 0.25})]:
        counts = kind_counts(n, fractions)
        assert sum(counts.values()) == n
        for kind in KINDS:
            assert abs(counts[kind] - n * fractions[kind]) < 1
        demo = {"seed": 3, "n_train": n, "n_test": 2, "completeness": fractions}
        assert Counter(plan(demo).train.values()) == {k: v for k, v in counts.items() if v}
    assert kind_counts(4000, load_config(REPO / "config" / "config.yaml", completeness={})["demo"]["completeness"]) == {
        "strong": 222, "lesion_only": 888, "partial": 1090, "unlabeled": 1800}  # schema defaults: FLARE23 (Fig. 2)
    with pytest.raises(ValueError, match="sum to 1"):
        kind_counts(10, {"strong": 0.5, "lesion_only": 0.2, "partial": 0.0, "unlabeled": 0.0})


def test_files_and_dataset_json_follow_the_plan(tiny) -> None:
    config, results, dataset = tiny
    demo_plan = plan(config["demo"])
    assert dataset["numTraining"] == len(demo_plan.train) == config["demo"]["n_train"]
    assert dataset["numTest"] == len(demo_plan.test) == config["demo"]["n_test"]
    assert dataset["annotation"] == demo_plan.train
    assert Counter(dataset["annotation"].values()) == {
        k: v for k, v in kind_counts(config["demo"]["n_train"], config["demo"]["completeness"]).items() if v}
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == {"background": 0, **{e["name"]: e["id"] for e in config["labels"]}}
    demo_root = Path(dataset_json_path(str(results))).parent
    for record in dataset["cases"]:
        expected = case_files(str(results), record["case"], record["kind"])
        assert {k: str(demo_root / v) for k, v in record["files"].items()} == expected
        assert all(Path(path).is_file() for path in expected.values())
    labelled = sorted(p.name for p in (demo_root / "labelsTr").iterdir())
    assert labelled == sorted(f"{case}.nii.gz" for case in demo_plan.labelled)
    assert sorted(p.name for p in (demo_root / "truthTr").iterdir()) == sorted(f"{c}.nii.gz" for c in demo_plan.train)
    assert sorted(p.name for p in (demo_root / "labelsTs").iterdir()) == sorted(f"{c}.nii.gz" for c in demo_plan.test)
    assert not list(demo_root.rglob(".*")), "temporary files left behind"


def test_written_labels_are_the_truth_restricted_to_the_annotated_classes(tiny) -> None:
    config, results, dataset = tiny
    organ_ids, lesion_id = ids(config)
    organs = set(organ_ids.values())
    partial_sets = [{organ_ids[name] for name in names} for names in config["demo"]["partial_annotations"]]
    for record in dataset["cases"]:
        case, kind, annotated = record["case"], record["kind"], record["annotated"]
        if kind == "test":
            truth, _ = read_label(case_files(str(results), case, kind)["label"], case)
            assert set(np.unique(truth)) == {0, *organs, lesion_id}, "test labels must be complete (with a lesion)"
            continue
        truth, _ = read_label(truth_path(str(results), case), case)
        present = set(np.unique(truth)) - {0}
        assert organs <= present, f"{case}: every organ is in the truth"
        assert (lesion_id in present) == (record["lesions"] > 0)
        label_file = case_files(str(results), case, kind).get("label")
        if kind == "unlabeled":
            assert label_file is None and annotated == []
            continue
        label, _ = read_label(label_file, case)
        np.testing.assert_array_equal(label, np.where(np.isin(truth, annotated), truth, 0))
        lesion = [lesion_id] if lesion_id in present else []
        annotated_organs = set(annotated) - {lesion_id}
        if kind == "strong":
            assert annotated == sorted(organs) + lesion
        elif kind == "lesion_only":
            assert annotated == [lesion_id] and lesion_id in present, "a lesion-only case holds a lesion"
        else:
            assert kind == "partial" and annotated_organs in partial_sets, "one of demo.partial_annotations"
            assert set(annotated) - annotated_organs == set(lesion)
        assert set(np.unique(label)) == {0, *annotated}


def test_geometry_is_shared_and_in_the_configured_ranges(tiny) -> None:
    config, results, dataset = tiny
    demo = config["demo"]
    origins = []
    for record in dataset["cases"]:
        files = case_files(str(results), record["case"], record["kind"])
        image, geometry = read_volume(files["image"], record["case"])
        assert image.dtype == np.int16
        for key in ("label", "truth"):
            if key in files:
                label, label_geometry = read_label(files[key], record["case"])
                assert label.dtype == np.uint8 and label_geometry == geometry
        (nz, ny, nx), (sz, sy, sx) = geometry.shape_zyx, geometry.spacing_zyx
        jitter = demo["shape_jitter"]
        for n, base in zip((nz, ny, nx), demo["shape"]):
            assert base * (1 - jitter) - 1 <= n <= base * (1 + jitter) + 1
        assert demo["extent_mm"]["z"][0] - 1e-3 <= sz * nz <= demo["extent_mm"]["z"][1] + 1e-3
        assert demo["extent_mm"]["xy"][0] - 1e-3 <= sx * nx <= demo["extent_mm"]["xy"][1] + 1e-3
        assert sx == pytest.approx(sy) and sz != pytest.approx(sx)
        assert geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert all(abs(o) > 1 for o in geometry.origin), "origins are scanner-like, not zero"
        origins.append(geometry.origin)
    assert len(set(origins)) == len(origins), "every case has its own placement"


def test_every_organ_present_on_tiny_grids_for_many_seeds() -> None:
    params = DemoParams.from_config(load_config()["demo"])
    organ_ids, lesion_id = ids(load_config())
    for seed in range(25):
        params = DemoParams(**{**params.__dict__, "seed": seed})
        synthetic = generate_case(f"case{seed}", "lesion_only", params, organ_ids, lesion_id)
        counts = np.bincount(synthetic.truth.ravel(), minlength=lesion_id + 1)
        assert counts[list(organ_ids.values())].min() >= demo_anatomy.MIN_ORGAN_VOXELS
        assert counts[lesion_id] > 0


def test_intensities_are_plausible_per_tissue() -> None:
    config = load_config(shape=[48, 96, 96], shape_jitter=0.0)
    organ_ids, lesion_id = ids(config)
    params = DemoParams.from_config(config["demo"])
    synthetic = generate_case("FLARE23Ts_0001", "test", params, organ_ids, lesion_id)
    image, truth, tissue = synthetic.image.astype(float), synthetic.truth, synthetic.anatomy.tissue

    def mean_in(mask: np.ndarray) -> float:
        core = ndimage.binary_erosion(mask)  # away from partial-volume borders
        assert core.sum() > 10
        return float(image[core].mean())

    assert 30 <= mean_in(truth == organ_ids["Liver"]) <= 90  # soft tissue
    assert 20 <= mean_in(truth == organ_ids["Spleen"]) <= 80
    assert 140 <= mean_in(truth == organ_ids["Aorta"]) <= 260  # contrast-filled vessel
    assert mean_in(truth == organ_ids["Aorta"]) > mean_in(truth == organ_ids["IVC"]) - 10
    assert mean_in((tissue == demo_anatomy.MARROW) | (tissue == demo_anatomy.CORTEX)) > 300  # bone
    assert -140 <= mean_in((tissue == demo_anatomy.FAT) & (truth == 0)) <= -60
    assert abs(mean_in((tissue == demo_anatomy.AIR) & (truth == 0)) + 1000) < 30
    organs = [mean_in(truth == i) for i in organ_ids.values() if ndimage.binary_erosion(truth == i).sum() > 10]
    assert np.std(organs) > 20, "organs need distinct-ish means to be learnable"
    for lesion in synthetic.anatomy.lesions:  # lesions differ from their host
        host = truth == organ_ids[lesion.host]
        lesion_mean = image[lesion.box][lesion.mask].mean()
        assert abs(lesion_mean - image[host].mean()) > 10


def test_cases_are_deterministic_and_independent_of_n_train_and_workers(tiny, tmp_path) -> None:
    config, results, dataset = tiny
    again = copy.deepcopy(config)
    again["demo"]["n_train"] += 4
    generate_dataset(again["demo"], again["labels"], str(tmp_path), threads=1)
    kinds_again = plan(again["demo"]).train
    compared = 0
    for record in dataset["cases"]:
        if kinds_again.get(record["case"], "test") != record["kind"]:
            continue  # the kind (and so the label) may change with n_train
        first = case_files(str(results), record["case"], record["kind"])
        second = case_files(str(tmp_path), record["case"], record["kind"])
        for key in first:
            assert Path(first[key]).read_bytes() == Path(second[key]).read_bytes(), (record["case"], key)
            compared += 1
    assert compared >= 10

    other_seed = dict(config["demo"], seed=config["demo"]["seed"] + 1)
    organ_ids, lesion_id = ids(config)
    case = dataset["cases"][0]["case"]
    a = generate_case(case, "strong", DemoParams.from_config(config["demo"]), organ_ids, lesion_id)
    b = generate_case(case, "strong", DemoParams.from_config(other_seed), organ_ids, lesion_id)
    assert a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)
    c = generate_case("another", "strong", DemoParams.from_config(config["demo"]), organ_ids, lesion_id)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_partial_cases_draw_one_configured_organ_set_or_a_random_subset() -> None:
    """FLARE23's partial labels come from single-organ datasets (default sets); null keeps the uniform random
    subsets. Which set a case gets is drawn uniformly, and the annotation never changes the image or the truth, so
    a teacher's pseudo-labels do not depend on it."""
    config = load_config()
    organ_ids, lesion_id = ids(config)
    organs = sorted(organ_ids.values())
    sets = partial_organ_sets([["Liver"], ["RK", "LK"], ["Pancreas"]], organ_ids)
    assert sets == [[organ_ids["Liver"]], sorted([organ_ids["RK"], organ_ids["LK"]]), [organ_ids["Pancreas"]]]
    rng = np.random.default_rng(0)
    drawn = Counter(tuple(annotated_classes("partial", rng, organ_ids, lesion_id, True, sets)) for _ in range(600))
    assert set(drawn) == {(*s, lesion_id) for s in sets}
    assert min(drawn.values()) > 150, "each set is drawn about equally often"
    random_subsets = [annotated_classes("partial", rng, organ_ids, lesion_id, False, None) for _ in range(200)]
    assert all(0 < len(s) < len(organs) and set(s) <= set(organs) for s in random_subsets)
    assert len({tuple(s) for s in random_subsets}) > 150

    case = "FLARE23_0001"
    default = generate_case(case, "partial", DemoParams.from_config(config["demo"]), organ_ids, lesion_id)
    uniform = generate_case(case, "partial", DemoParams.from_config(dict(config["demo"], partial_annotations=None)),
                            organ_ids, lesion_id)
    np.testing.assert_array_equal(default.image, uniform.image)
    np.testing.assert_array_equal(default.truth, uniform.truth)


def test_bad_configuration_is_reported_clearly() -> None:
    config = load_config()
    labels = [dict(e, name="Kidney_R") if e["name"] == "RK" else e for e in config["labels"]]
    with pytest.raises(ValueError, match=r"lacks \['RK'\].*cannot draw \['Kidney_R'\]"):
        flare_ids(labels)
    with pytest.raises(ValueError, match="0 lesion classes"):
        flare_ids([e for e in config["labels"] if e["kind"] != "lesion"])
    with pytest.raises(ValueError, match=r"demo.noise_hu must be \[low, high\]"):
        DemoParams.from_config(dict(config["demo"], noise_hu=[20, 8]))
    with pytest.raises(ValueError, match=r"partial_annotations: \['Kidney'\] are not organs"):
        DemoParams.from_config(dict(config["demo"], partial_annotations=[["Liver"], ["Kidney"]]))
    with pytest.raises(ValueError, match="holds every organ; that is a strong case"):
        DemoParams.from_config(dict(config["demo"], partial_annotations=[list(ids(config)[0])]))
    with pytest.raises(ValueError, match="not organs"):  # checked before any case is drawn
        generate_dataset(dict(config["demo"], partial_annotations=[["Colon"]]), config["labels"], "/nonexistent")


def test_a_failing_case_is_named_and_no_dataset_json_is_written(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(demo_anatomy, "MIN_ORGAN_VOXELS", 10**9)  # no organ can satisfy this
    config = load_config(n_train=2, n_test=1)
    with pytest.raises(CaseError, match=r"case 'FLARE23_0001'.*fewer than"):
        generate_dataset(config["demo"], config["labels"], str(tmp_path), threads=2)  # error crosses processes
    assert not Path(dataset_json_path(str(tmp_path))).exists()
    with pytest.raises(SystemExit):
        main(["--spec", spec_json(config), "--dataset-json", str(tmp_path / "elsewhere.json")])


def test_gpu_config_is_complete_and_gpu_sized() -> None:
    config = load_config(REPO / "config" / "gpu_demo.yaml")
    demo = config["demo"]
    assert demo["enabled"] and config["device"] == "cuda"
    assert demo["n_train"] >= 40 and demo["shape"] == [128, 192, 192]
    counts = kind_counts(demo["n_train"], demo["completeness"])
    assert counts["strong"] >= 10, "the teacher needs strong cases to learn from"
    flare_ids(config["labels"])


@pytest.mark.slow
def test_rule_demo_dataset_runs_in_the_workflow(tmp_path) -> None:
    """With ``results`` outside the working directory, the job's log and benchmark go there too (DESIGN: under the
    results folder, so runs of different configs keep their own) and the working directory gets none."""
    results = tmp_path / "elsewhere"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({**yaml.safe_load(TINY_CONFIG.read_text()), "results": str(results)}))
    workdir = tmp_path / "work"
    target = str(results / "demo" / "dataset.json")
    run_workflow(workdir, target, config=config_file)
    config = load_config()
    dataset = json.loads((results / "demo" / "dataset.json").read_text())
    assert dataset["annotation"] == plan(config["demo"]).train
    assert (results / "logs" / "demo_dataset" / "all.log").read_text().strip().endswith("processes")
    assert (results / "benchmarks" / "demo_dataset" / "all.tsv").is_file()
    assert not (workdir / "logs").exists() and not (workdir / "benchmarks").exists()
    dry = run_workflow(workdir, target, "--dry-run", config=config_file)
    assert "Nothing to be done" in dry.stdout + dry.stderr
