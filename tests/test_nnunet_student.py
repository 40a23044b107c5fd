"""Tests of the nnU-Net student option: dataset with the ignore label, per-batch-size plans and the batch size the
trainer really uses, the predictor without mirroring, the softmax ensemble, and one end-to-end workflow run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from conftest import TINY_CONFIG, run_workflow

from workflow_scripts.evaluation.efficiency import EFFICIENCY_COLUMNS
from workflow_scripts.io.manifest import TrainingCase, read_manifest, write_manifest
from workflow_scripts.nnunet import student as ns
from workflow_scripts.nnunet.ext import configure_environment
from workflow_scripts.nnunet.predict import _preprocessing_key, _probabilities, load_ensemble, predict_volume
from workflow_scripts.nnunet.training import custom_configuration, custom_plans_identifier
from workflow_scripts.io.volumes import read_volume

LABELS = [
    {"id": 1, "name": "liver", "kind": "organ"},
    {"id": 2, "name": "kidney", "kind": "organ"},
    {"id": 3, "name": "lesion", "kind": "lesion"},
]
IGNORE = 4
SHAPE = (16, 24, 24)
SPACING = (1.5, 1.0, 1.0)  # x, y, z as SimpleITK writes it


def _write(array: np.ndarray, path: Path) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(path))
    return str(path)


def _case(folder: Path, name: str, seed: int, with_ignore: bool) -> TrainingCase:
    """A tiny CT-like case: two bright 'organs' and a 'lesion'; optionally an ignore band."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[3:12, 4:12, 3:11] = 1
    label[4:11, 14:20, 13:21] = 2
    label[6:9, 6:9, 5:8] = 3
    if with_ignore:
        label[:, :2, :] = IGNORE
    image = rng.normal(-800, 20, SHAPE) + np.choose(label, [0, 860, 830, 900, 0])
    folder.mkdir(parents=True, exist_ok=True)
    return TrainingCase(name, _write(image.astype(np.float32), folder / f"{name}_0000.nii.gz"),
                           _write(label, folder / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    """A planned and preprocessed tiny student dataset (merged labels with the ignore label), batch sizes 2 and 4."""
    tmp = tmp_path_factory.mktemp("nnunet_student")
    cases = [_case(tmp / "data", f"case{i}", i, with_ignore=True) for i in range(4)]
    root = tmp / "nnunet"
    name = ns.student_dataset_name(950, "tiny")
    dataset = ns.build_student_dataset(cases, root / "raw" / name, LABELS, with_ignore=True)
    base = ns.plan_and_preprocess(root, 950, "ExperimentPlanner", "3d_fullres", 1)
    settings = {"num_epochs": 1, "num_iterations_per_epoch": 1, "num_val_iterations_per_epoch": 1, "save_every": 1}
    plans = ns.student_plans(json.loads(base.read_text()), "ExperimentPlanner", "3d_fullres", settings, [2, 4],
                             patch_size=[16, 16, 16], features_per_stage=[4, 8, 16])
    (base.parent / f"{custom_plans_identifier('ExperimentPlanner')}.json").write_text(json.dumps(plans))
    return {"root": root, "name": name, "dataset": dataset, "plans": plans, "cases": cases}


@pytest.fixture(scope="module")
def trained(planned) -> dict:
    """The batch-2 and batch-4 models of the tiny dataset (1 epoch of 1 iteration each)."""
    folders = {}
    for batch in (2, 4):
        checkpoint = ns.train_model(planned["root"], 950, "ExperimentPlanner", "3d_fullres", batch, "all", "cpu", 1)
        folders[batch] = ns.student_model_folder(planned["root"], planned["name"], "ExperimentPlanner", "3d_fullres",
                                                 batch)
        assert checkpoint == folders[batch] / "fold_all" / "checkpoint_final.pth" and checkpoint.is_file()
    return {**planned, "folders": folders}


def test_experiment_dataset_ids_offset_in_config_order():
    experiments = {"b": {"labels": "raw", "model": "nnunet"}, "two_stage": {"labels": "merged"},
                   "a": {"labels": "merged", "model": "nnunet"}}
    assert ns.experiment_dataset_ids(experiments, 902) == {"b": 902, "a": 903}
    assert ns.experiment_dataset_ids({"two_stage": {"labels": "merged", "model": "c2f"}}, 902) == {}
    with pytest.raises(ValueError, match="<= 999"):
        ns.experiment_dataset_ids(experiments, 999)


def test_ignore_label_only_for_merged_labels_with_ignore():
    assert ns.uses_ignore_label("merged", ["ignore"])
    assert not ns.uses_ignore_label("merged", ["background"])
    assert not ns.uses_ignore_label("raw", ["ignore"])
    classes, names = ns.dataset_classes(LABELS, with_ignore=False)
    assert classes == [1, 2, 3] and IGNORE not in names


def test_dataset_declares_ignore_as_highest_label(planned):
    labels = planned["dataset"]["labels"]
    assert labels == {"background": 0, "liver": 1, "kidney": 2, "lesion": 3, "ignore": IGNORE}
    raw = planned["root"] / "raw" / planned["name"]
    on_disk = json.loads((raw / "dataset.json").read_text())
    assert on_disk["labels"]["ignore"] == max(on_disk["labels"].values())
    # ids are already consecutive: images and labels are symlinks, the inputs stay untouched
    assert (raw / "labelsTr" / "case0.nii.gz").is_symlink() and (raw / "imagesTr" / "case0_0000.nii.gz").is_symlink()


def test_dataset_rejects_ignore_values_when_not_declared(tmp_path):
    case = _case(tmp_path / "data", "bad", 0, with_ignore=True)
    with pytest.raises(Exception, match="bad.*not in the label map"):
        ns.build_student_dataset([case], tmp_path / "raw" / "Dataset951_x", LABELS, with_ignore=False)
    assert not (tmp_path / "raw" / "Dataset951_x" / "dataset.json").exists()
    manifest = tmp_path / "train_cases.tsv"
    write_manifest(manifest, [case.case], [case.image], [case.label])
    with pytest.raises(SystemExit, match=r"case 'bad' \(file .*bad.nii.gz\).*\[4\]"):
        ns.main(["dataset", "--manifest", str(manifest), "--label-map", json.dumps(LABELS), "--output",
                 str(tmp_path / "raw" / "Dataset951_x")])


def test_dataset_rebuild_drops_cases_no_longer_listed(tmp_path):
    cases = [_case(tmp_path / "data", f"c{i}", i, with_ignore=False) for i in range(2)]
    root = tmp_path / "raw" / "Dataset952_x"
    ns.build_student_dataset(cases, root, LABELS, with_ignore=False)
    dataset = ns.build_student_dataset(cases[:1], root, LABELS, with_ignore=False)
    assert dataset["numTraining"] == 1 and "ignore" not in dataset["labels"]
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["c0_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["c0.nii.gz"]


def test_dataset_cli_from_manifest(tmp_path):
    cases = [_case(tmp_path / "data", f"c{i}", i, with_ignore=True) for i in range(2)]
    manifest = tmp_path / "train_cases.tsv"
    write_manifest(manifest, [c.case for c in cases], [c.image for c in cases], [c.label for c in cases])
    out = tmp_path / "raw" / "Dataset953_cli"
    ns.main(["dataset", "--manifest", str(manifest), "--label-map", json.dumps(LABELS), "--ignore", "--output", str(out)])
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["labels"]["ignore"] == IGNORE


def test_manifest_round_trip(tmp_path):
    write_manifest(tmp_path / "m.tsv", ["a", "b"], ["ia", "ib"], ["la", "lb"])
    assert read_manifest(tmp_path / "m.tsv") == [TrainingCase("a", "ia", "la"), TrainingCase("b", "ib", "lb")]
    with pytest.raises(ValueError, match="lengths differ"):
        write_manifest(tmp_path / "n.tsv", ["a"], ["ia", "ib"], ["la"])


def test_student_plans_one_configuration_per_batch_size(planned):
    plans = planned["plans"]
    assert plans["plans_name"] == custom_plans_identifier("ExperimentPlanner")
    for batch in (2, 4):
        conf = plans["configurations"][custom_configuration(ns.batch_configuration("3d_fullres", batch))]
        assert conf["inherits_from"] == "3d_fullres" and conf["batch_size"] == batch
    assert custom_configuration("3d_fullres") not in plans["configurations"]
    with pytest.raises(ValueError, match="unique"):
        ns.student_plans(plans, "ExperimentPlanner", "3d_fullres", {}, [4, 4])


@pytest.mark.parametrize("batch", [2, 4])
def test_trainer_draws_batches_of_the_configured_size(planned, batch):
    """The batch nnU-Net's data loader really yields, not just the number in the plans."""
    configure_environment(planned["root"], 1, augmentation_workers=0)
    import torch
    from workflow_scripts.nnunet.ext.configurable_trainer import nnUNetTrainerConfigurable

    configuration = custom_configuration(ns.batch_configuration("3d_fullres", batch))
    plans = {**planned["plans"], "continue_training": False}  # what nnU-Net's run_training adds
    trainer = nnUNetTrainerConfigurable(plans, configuration, "all", planned["dataset"], device=torch.device("cpu"))
    trainer.initialize()
    train_loader, _ = trainer.get_dataloaders()
    drawn = next(train_loader)
    assert trainer.batch_size == batch
    assert drawn["data"].shape[0] == batch
    assert trainer.label_manager.has_ignore_label and trainer.label_manager.ignore_label == IGNORE


def _forward_batch_sizes(ensemble, volume, spacing) -> list[int]:
    """Batch size of every network call while predicting ``volume``."""
    sizes: list[int] = []
    hooks = [p.network.register_forward_hook(lambda _net, inputs, _out: sizes.append(inputs[0].shape[0]))
             for p in ensemble.predictors]
    predict_volume(ensemble, volume, spacing)
    for hook in hooks:
        hook.remove()
    return sizes


def test_predictor_runs_without_mirroring(trained):
    """--no-tta (what the predict rules pass): one patch per sliding window instead of one per mirroring; with TTA
    the mirrored copies of a window go through the network in one call."""
    volume, geometry = read_volume(trained["cases"][0].image, "case0")
    plain = load_ensemble([trained["folders"][2]], "all", "cpu", tta=False)
    mirrored = load_ensemble([trained["folders"][2]], "all", "cpu", tta=True)
    assert not plain.predictors[0].use_mirroring
    axes = mirrored.predictors[0].allowed_mirroring_axes
    assert axes, "the tiny model allows mirroring, so TTA would multiply the patches"
    windows = _forward_batch_sizes(plain, volume, geometry.spacing_zyx)
    assert windows and set(windows) == {1}
    assert _forward_batch_sizes(mirrored, volume, geometry.spacing_zyx) == [2 ** len(axes)] * len(windows)


def test_ensemble_averages_the_models_softmax(trained):
    """The ensemble's labels are the argmax of the mean of the two models' softmax, and differ from each model's."""
    import torch

    volume, geometry = read_volume(trained["cases"][1].image, "case1")
    pair = load_ensemble([trained["folders"][2], trained["folders"][4]], "all", "cpu", tta=False)
    assert len({_preprocessing_key(p) for p in pair.predictors}) == 1, "the models share one preprocessing"
    first = pair.predictors[0]
    data, _, properties = first.configuration_manager.preprocessor_class(verbose=False).run_case_npy(
        volume[None].astype(np.float32), None, {"spacing": list(geometry.spacing_zyx)}, first.plans_manager,
        first.configuration_manager, first.dataset_json)
    with torch.inference_mode():
        softmax = []
        for p in pair.predictors:
            probabilities, box = _probabilities(p, data, properties, pair.device)
            assert probabilities.shape[1:] == volume[box].shape == volume.shape  # CT noise: no empty border
            softmax.append(probabilities.numpy())
    singles = [pair.label_ids[s.argmax(0)] for s in softmax]
    assert not np.array_equal(singles[0], singles[1]), "two different models are needed for a meaningful check"
    labels, _ = predict_volume(pair, volume, geometry.spacing_zyx)
    np.testing.assert_array_equal(labels, pair.label_ids[(softmax[0] + softmax[1]).argmax(0)])
    assert labels.shape == volume.shape


@pytest.mark.slow
def test_workflow_trains_and_predicts_nnunet_student(tmp_path):
    """The tiny workflow with an nnU-Net experiment on merged labels (low-confidence voxels as the ignore label):
    two models (batch 2 and 4), their ensemble's test predictions and efficiency table; a rerun has nothing to do."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["student"]["experiments"]["nnunet_b2"] = {"labels": "merged", "model": "nnunet"}
    config["student"]["nnunet"]["batch_sizes"] = [2, 4]
    config["merge"].update(low_confidence_as="ignore", min_confidence=0.6)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    pred = Path("results", "student", "nnunet_b2", "pred")
    run_workflow(tmp_path, str(pred / "efficiency" / "0000.tsv"), config=config_file)

    dataset = json.loads(next((tmp_path / "results/student/nnunet_b2/nnunet/raw").glob("Dataset912_*/dataset.json"))
                         .read_text())
    assert dataset["labels"]["ignore"] == 15 and dataset["numTraining"] > 0
    for batch in (2, 4):
        log = next((tmp_path / "results" / "logs" / "student_nnunet_train").glob(f"nnunet_b2_*_b{batch}.log")).read_text()
        assert f"batch size {batch}" in log
        assert len(list((tmp_path / "results/student/nnunet_b2/nnunet/results").glob(
            f"*/*3d_fullres_b{batch}_wf/fold_0/checkpoint_final.pth"))) == 1
    table = pd.read_csv(tmp_path / pred / "efficiency" / "0000.tsv", sep="\t")
    assert list(table.columns) == EFFICIENCY_COLUMNS
    ids = {0} | set(dataset["workflow_label_ids"].values()) - {15}  # classes the model can predict
    for case in table["Name"]:
        image = sitk.ReadImage(str(tmp_path / "results/demo/imagesTs" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(tmp_path / pred / f"{case}.nii.gz"))
        assert label.GetSize() == image.GetSize() and label.GetOrigin() == image.GetOrigin()
        assert set(np.unique(sitk.GetArrayFromImage(label)).tolist()) <= ids
    rerun = run_workflow(tmp_path, "-n", str(pred / "efficiency" / "0000.tsv"), config=config_file)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
