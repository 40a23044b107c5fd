"""Benchmark: our pseudo-labelling against nnU-Net's own ``predict_from_files``, same model, same volumes.

A small teacher is trained (or reused from ``--workdir``) with the workflow's own code on synthetic FLARE23-like
cases of the demo (config/config.yaml: its demo anatomy and its tiny teacher plans), then both methods predict
the same synthetic test volumes drawn at ``--shape``, both with mirroring TTA:

- ours: ``nnunet_predict`` as the pseudo_shard rule runs it: one process, nnU-Net's preprocessing and sliding
  window with the mirrored copies of each patch in one batch (``nnunet_mirroring``), the export with torch on the
  model's device, then connected-component cleanup and the uint8 label and confidence files
  (``pseudo_labels.write_pseudo_label``);
- nnU-Net: ``nnUNetPredictor.predict_from_files`` with its defaults: background worker processes for
  preprocessing and export, the default export (scikit-image resampling of every class's logits on the CPU).

Each method's time is the wall time for all volumes (model loading excluded for both). The voxel agreement
compares nnU-Net's label maps with our argmax before cleanup (the cleanup is ours alone). ``--summary`` also writes
the results as JSON (bench/gpu_suite.py collects it).

    .venv/bin/python bench/pseudo_label_speed.py                                   # CPU, 2 cores
    .venv/bin/python bench/pseudo_label_speed.py --device cuda --shape 512 512 100  # FLARE-sized, ~0.8x0.8x2.5 mm

Goals: ratio >= 3x, agreement >= 99.9 %.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.nnunet import training  # noqa: E402
from workflow_scripts.demo.dataset import DemoParams, flare_ids, generate_case  # noqa: E402
from workflow_scripts.io.config_defaults import config_with_defaults  # noqa: E402
from workflow_scripts.nnunet.dataset import TrainingCase, build_dataset, dataset_name  # noqa: E402
from workflow_scripts.nnunet.ext import configure_environment  # noqa: E402
from workflow_scripts.labels.postprocess import rules_from_config  # noqa: E402
from workflow_scripts.io.volumes import write_volume  # noqa: E402

DATASET_ID = 986


def demo_config() -> dict:
    """config/config.yaml with the schema defaults filled in (demo anatomy, labels, the tiny teacher)."""
    return config_with_defaults(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))


def write_cases(config: dict, shape_xyz: list[int] | None, n_cases: int, folder: Path, prefix: str,
                ) -> list[TrainingCase]:
    """Synthetic cases with full labels (the demo's test kind); ``shape_xyz`` None keeps the demo's shape."""
    demo = dict(config["demo"])
    if shape_xyz is not None:
        demo.update(shape=list(reversed(shape_xyz)), shape_jitter=0.0)
    params = DemoParams.from_config(demo)
    organ_ids, lesion_id = flare_ids(config["labels"])
    cases = []
    for i in range(n_cases):
        name = f"{prefix}_{i:03d}"
        case = generate_case(name, "test", params, organ_ids, lesion_id)
        image, label = folder / f"{name}_0000.nii.gz", folder / f"{name}.nii.gz"
        write_volume(image, case.image, case.geometry)
        write_volume(label, case.truth, case.geometry)
        cases.append(TrainingCase(name, str(image), str(label)))
    print(f"{n_cases} {prefix} cases of {'x'.join(map(str, case.geometry.size))} voxels, spacing "
          f"{'x'.join(f'{s:.2f}' for s in case.geometry.spacing)} mm (x, y, z)", flush=True)
    return cases


def trained_teacher(config: dict, root: Path, args: argparse.Namespace) -> Path:
    """The model folder of a teacher trained with the demo's tiny plans (reused when already trained)."""
    t = config["teacher"]
    model = training.model_folder(root, dataset_name(DATASET_ID, "Teacher"), t["planner"], t["configuration"])
    if (model / "fold_all" / "checkpoint_final.pth").is_file():
        print(f"reusing the teacher in {model}", flush=True)
        return model
    (root / "train").mkdir(parents=True, exist_ok=True)
    cases = write_cases(config, None, args.train_cases, root / "train", "train")
    names = {entry["id"]: entry["name"] for entry in config["labels"]}
    build_dataset(cases, root / "raw" / dataset_name(DATASET_ID, "Teacher"), t["classes"], names)
    base = training.plan_and_preprocess(root, DATASET_ID, t["planner"], t["configuration"], args.threads)
    settings = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iterations,
                "num_val_iterations_per_epoch": 1, "save_every": args.epochs}
    plans = training.configure_plans(json.loads(base.read_text()), t["planner"], t["configuration"], settings,
                                    t["batch_size"], t["patch_size"], t["features_per_stage"])
    (base.parent / f"{training.custom_plans_identifier(t['planner'])}.json").write_text(json.dumps(plans))
    start = time.perf_counter()
    training.train(root, DATASET_ID, t["planner"], t["configuration"], "all", args.device, args.threads)
    print(f"teacher trained in {time.perf_counter() - start:.0f} s ({args.epochs} x {args.iterations} iterations)",
          flush=True)
    return model


def run_ours(config: dict, model: Path, cases: list[TrainingCase], out: Path, args: argparse.Namespace,
             ) -> tuple[float, dict[str, np.ndarray]]:
    """Wall time of our pseudo-labelling for all cases, and its argmax before cleanup per case."""
    from workflow_scripts.nnunet.predict import load_ensemble, predict_shard
    from workflow_scripts.labels.pseudo import write_pseudo_label

    ensemble = load_ensemble([model], "all", args.device, tta=True, threads=args.threads)
    rules = rules_from_config(config["postprocess"], config["labels"])
    raw: dict[str, np.ndarray] = {}

    def write(case, label, confidence, geometry):
        raw[case] = label
        write_pseudo_label(out, case, label, confidence, geometry, rules)

    start = time.perf_counter()
    table = predict_shard(ensemble, [c.case for c in cases], [c.image for c in cases], write, with_confidence=True)
    elapsed = time.perf_counter() - start
    print(table.to_string(index=False), flush=True)
    return elapsed, raw


def run_nnunet(model: Path, cases: list[TrainingCase], out: Path, args: argparse.Namespace) -> float:
    """Wall time of nnU-Net's predict_from_files (TTA, default export, default worker processes)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=True, device=torch.device(args.device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), ("all",))
    start = time.perf_counter()
    predictor.predict_from_files([[c.image] for c in cases], str(out), save_probabilities=False, overwrite=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="voxels of the predicted volumes (default: the demo's shape)")
    parser.add_argument("--cases", type=int, default=4, help="volumes predicted by each method")
    parser.add_argument("--train-cases", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10, help="training iterations per epoch")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads and nnU-Net worker processes (1 avoids OpenMP contention on busy CPUs)")
    parser.add_argument("--workdir", help="keep data and the teacher here and reuse them (default: temporary)")
    parser.add_argument("--skip-nnunet", action="store_true", help="time ours only (a quick check of the script)")
    parser.add_argument("--summary", help="also write the results as JSON to this file")
    args = parser.parse_args()
    config = demo_config()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp).resolve()
        configure_environment(root, args.threads)
        start = time.perf_counter()
        model = trained_teacher(config, root, args)
        teacher_s = time.perf_counter() - start
        shape = "x".join(map(str, args.shape)) if args.shape else "demo"
        folder = root / f"bench_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        cases = write_cases(config, args.shape, args.cases, folder, "bench")
        ours_time, ours = run_ours(config, model, cases, folder / "ours", args)
        summary = {"shape": shape, "device": args.device, "threads": args.threads, "cases": len(cases),
                   "teacher_s": teacher_s, "ours_s_per_case": ours_time / len(cases)}
        print(f"\n{len(cases)} volumes ({shape}) on {args.device}, {args.threads} threads, mirroring TTA:")
        print(f"  ours    {ours_time:8.2f} s ({ours_time / len(cases):.2f} s/case, incl. cleanup + confidence map)")
        if not args.skip_nnunet:
            nnunet_time = run_nnunet(model, cases, folder / "nnunet", args)
            agreement = voxel_agreement(config, cases, folder / "nnunet", ours)
            summary.update(nnunet_s_per_case=nnunet_time / len(cases),
                           speed_ratio_nnunet_over_ours=nnunet_time / ours_time, voxel_agreement_pct=agreement)
            print(f"  nnU-Net {nnunet_time:8.2f} s ({nnunet_time / len(cases):.2f} s/case, predict_from_files)")
            print(f"  speed ratio nnU-Net / ours: {nnunet_time / ours_time:.2f}x (goal >= 3x)")
            print(f"  voxel agreement: {agreement:.3f} % (goal >= 99.9 %)")
        if args.summary:
            Path(args.summary).write_text(json.dumps(summary, indent=1))


def voxel_agreement(config: dict, cases: list[TrainingCase], folder: Path, ours: dict[str, np.ndarray]) -> float:
    """Percentage of voxels where nnU-Net's label maps in ``folder`` equal our argmax before cleanup."""
    ids = np.array([0, *sorted(config["teacher"]["classes"])])  # nnU-Net's consecutive ids -> workflow ids
    agree = total = 0
    for case in cases:
        theirs = ids[sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case.case}.nii.gz")))]
        agree += int((theirs == ours[case.case]).sum())
        total += theirs.size
    return 100 * agree / total


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
