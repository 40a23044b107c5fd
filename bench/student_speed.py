"""Benchmark: the coarse-to-fine student against nnU-Net's default predictor, per case from read to write.

Both methods segment the same synthetic CT volumes (the demo's FLARE23-like anatomy, drawn at ``--shape``):

- the student at the schema's full-size defaults (coarse 160^3, fine 192^3, default channels, fp16 on CUDA),
  through ``c2f_predict.predict_case`` exactly as the workflow runs it (read, coarse, crop, fine, resample back,
  component cleanup, write);
- nnU-Net v2 with the 3d_fullres configuration its own default planner chooses for these volumes, run by
  ``nnUNetPredictor`` with its defaults: sliding window with step 0.5 and Gaussian weighting, mirroring TTA over
  all three axes, default export (resampling back and writing), one process (``predict_from_files_sequential``).

Speed and memory do not depend on the weights, so both networks are randomly initialised: nothing is trained.
Memory is sampled every 0.1 s with ``efficiency.ResourceSampler`` (on CUDA this process's memory on its GPU through
NVML, including the CUDA context as FLARE counts it; process RSS on CPU); on CUDA the peak of PyTorch's own
allocations is printed too. The first case of each method includes one-off start-up costs and is left out of the
medians. ``--summary`` also writes the medians and ratios as JSON (bench/gpu_suite.py collects it).

    .venv/bin/python bench/student_speed.py --device cuda                      # 512x512x300, the goal's size
    .venv/bin/python bench/student_speed.py --device cpu --shape 160 160 64    # CPU: nnU-Net's TTA is slow there

Goal on a GPU: student >= 15x faster than nnU-Net, student peak <= 2 GB for a 512x512x300 volume.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.c2f.model import StudentSpec, save_model  # noqa: E402
from workflow_scripts.c2f.predict import Student, predict_case  # noqa: E402
from workflow_scripts.demo.dataset import DemoParams, flare_ids, generate_case  # noqa: E402
from workflow_scripts.evaluation.efficiency import ResourceSampler, Usage  # noqa: E402
from workflow_scripts.io.config_defaults import config_with_defaults  # noqa: E402
from workflow_scripts.labels.postprocess import rules_from_config  # noqa: E402
from workflow_scripts.io.volumes import write_volume  # noqa: E402

DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID}_StudentSpeed"


def schema_defaults(c2f_overrides: dict) -> dict:
    """The configuration with every schema default filled in (the full-size settings for real data), with
    ``c2f_overrides`` applied to ``student.c2f`` (smaller grids for a quick check)."""
    return config_with_defaults({"student": {"c2f": c2f_overrides}})


def write_cases(config: dict, shape_xyz: list[int], n_cases: int, folder: Path) -> list[tuple[Path, Path]]:
    """Synthetic FLARE23-like test cases (image, full label) at exactly ``shape_xyz`` voxels."""
    demo = {**config["demo"], "shape": list(reversed(shape_xyz)), "shape_jitter": 0.0}
    params = DemoParams.from_config(demo)
    organ_ids, lesion_id = flare_ids(config["labels"])
    files = []
    for i in range(n_cases):
        case = generate_case(f"bench_{i:03d}", "test", params, organ_ids, lesion_id)
        image, label = folder / f"bench_{i:03d}_0000.nii.gz", folder / f"bench_{i:03d}.nii.gz"
        write_volume(image, case.image, case.geometry)
        write_volume(label, case.truth, case.geometry)
        files.append((image, label))
    spacing = case.geometry.spacing
    print(f"{n_cases} synthetic cases of {'x'.join(map(str, shape_xyz))} voxels, spacing "
          f"{'x'.join(f'{s:.2f}' for s in spacing)} mm (x, y, z)", flush=True)
    return files


def build_student(config: dict, device: str, folder: Path) -> Student:
    """The student at the schema's defaults, randomly initialised, loaded as the workflow loads it."""
    torch.manual_seed(0)
    c2f = config["student"]["c2f"]
    spec = StudentSpec.from_config(c2f, [entry["id"] for entry in config["labels"]])
    save_model(folder / "student.pt", spec, *spec.build())
    print(f"student: coarse {spec.coarse_size} channels {spec.coarse_channels}, fine {spec.fine_size} channels "
          f"{spec.fine_channels}, amp {c2f['amp']}", flush=True)
    return Student.load(folder / "student.pt", device, c2f["amp"])


def build_nnunet(config: dict, cases: list[tuple[Path, Path]], device: str, root: Path):
    """nnU-Net's default plan for these volumes and a randomly initialised model folder, loaded in its predictor.

    The planner runs on the benchmark cases themselves (fingerprint + ExperimentPlanner), so patch size, spacing
    and network are what nnU-Net would choose for such data. nnU-Net reads its folders from the environment when
    imported, hence the late imports.
    """
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = str(root / name)
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = root / "nnUNet_raw" / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for image, label in cases[:2]:
        os.symlink(image, raw / "imagesTr" / image.name)
        os.symlink(label, raw / "labelsTr" / label.name)
    labels = {"background": 0, **{entry["name"]: entry["id"] for entry in config["labels"]}}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": min(2, len(cases)),
                    "file_ending": ".nii.gz"}
    save_json(dataset_json, str(raw / "dataset.json"))
    extract_fingerprints([DATASET_ID], num_processes=1, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    plans_file = root / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"
    plans_manager = PlansManager(str(plans_file))
    configuration = plans_manager.get_configuration("3d_fullres")
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration, 1, len(labels),
                                                       enable_deep_supervision=False)
    model_dir = root / "nnUNet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (model_dir / "fold_0").mkdir(parents=True)
    save_json(dataset_json, str(model_dir / "dataset.json"))
    save_json(plans_manager.plans, str(model_dir / "plans.json"))
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               model_dir / "fold_0" / "checkpoint_final.pth")
    print(f"nnU-Net 3d_fullres: patch {configuration.patch_size}, spacing {configuration.spacing}, "
          f"{sum(p.numel() for p in network.parameters()) / 1e6:.1f} M parameters, mirroring TTA on (0, 1, 2)",
          flush=True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device == "cuda", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    return predictor


def measure(run, device: str) -> Usage:
    """Resource usage of ``run()``, starting from an empty CUDA cache so each case's peak is its own."""
    if device == "cuda":
        torch.cuda.empty_cache()
    with ResourceSampler(device, 0.1) as sampler:
        run()
    return sampler.usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], metavar=("X", "Y", "Z"))
    parser.add_argument("--cases", type=int, default=3, help="volumes per method (the first one warms up)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for PyTorch")
    parser.add_argument("--skip-nnunet", action="store_true", help="time the student only")
    parser.add_argument("--workdir", help="keep the synthetic data and models here (default: a temporary folder)")
    parser.add_argument("--c2f", type=json.loads, default={},
                        help="JSON overrides of the student's student.c2f settings (default: the schema's full size)")
    parser.add_argument("--summary", help="also write the summary as JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = schema_defaults(args.c2f)
    rules = rules_from_config(config["postprocess"], config["labels"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp).resolve()
        (root / "cases").mkdir(parents=True, exist_ok=True)
        cases = write_cases(config, args.shape, args.cases, root / "cases")
        methods = {"student": build_student(config, args.device, root)}
        if not args.skip_nnunet:
            methods["nnunet"] = build_nnunet(config, cases, args.device, root)
        results: dict[str, list[Usage]] = {name: [] for name in methods}
        for i, (image, _) in enumerate(cases):
            case = image.name.removesuffix("_0000.nii.gz")
            out = root / "pred"
            (out / "nnunet").mkdir(parents=True, exist_ok=True)
            runs = {"student": lambda: predict_case(methods["student"], case, str(image),
                                                    str(out / "student" / f"{case}.nii.gz"),
                                                    config["student"]["c2f"]["margin_mm"], rules)}
            if "nnunet" in methods:
                runs["nnunet"] = lambda: methods["nnunet"].predict_from_files_sequential(
                    [[str(image)]], [str(out / "nnunet" / case)], save_probabilities=False, overwrite=True)
            for name, run in runs.items():
                usage = measure(run, args.device)
                results[name].append(usage)
                print(f"{case} {name:8s} {usage.time_s:8.2f} s   peak {usage.memory_kind} {usage.peak_mem_mb:8.0f} MB"
                      f"   torch peak {usage.torch_peak_mb:8.0f} MB{'   (warm-up)' if i == 0 else ''}", flush=True)
        summary = summarise(results)
        report(summary, args)
        if args.summary:
            Path(args.summary).write_text(json.dumps({"shape": "x".join(map(str, args.shape)), "device": args.device,
                                                      "threads": args.threads, **summary}, indent=1))


def summarise(results: dict[str, list[Usage]]) -> dict:
    """Medians over the measured (non-warm-up) cases per method, and the nnU-Net / student ratios."""
    summary: dict = {}
    for name, rows in results.items():
        measured = rows[1:] or rows
        summary.update({f"{name}_s_per_case": statistics.median(u.time_s for u in measured),
                        f"{name}_peak_mb": max(u.peak_mem_mb for u in measured),
                        f"{name}_torch_peak_mb": max(u.torch_peak_mb for u in measured),
                        f"{name}_memory_kind": measured[0].memory_kind, "measured_cases": len(measured)})
    if "nnunet" in results:
        summary["speedup_nnunet_over_student"] = summary["nnunet_s_per_case"] / summary["student_s_per_case"]
        summary["memory_ratio_nnunet_over_student"] = summary["nnunet_peak_mb"] / summary["student_peak_mb"]
    return summary


def report(summary: dict, args: argparse.Namespace) -> None:
    """Print the summary: per method time, peak and torch peak, then the ratios and the goals."""
    print(f"\n{'x'.join(map(str, args.shape))} on {args.device} ({args.threads} threads), median of "
          f"{summary['measured_cases']} case(s):")
    for name in ("student", "nnunet"):
        if f"{name}_s_per_case" in summary:
            print(f"  {name:8s} {summary[f'{name}_s_per_case']:8.2f} s/case   peak {summary[f'{name}_memory_kind']} "
                  f"{summary[f'{name}_peak_mb']:8.0f} MB   torch peak {summary[f'{name}_torch_peak_mb']:8.0f} MB")
    if "speedup_nnunet_over_student" in summary:
        print(f"  speed-up nnU-Net / student: {summary['speedup_nnunet_over_student']:.1f}x (goal on GPU >= 15x); "
              f"memory ratio {summary['memory_ratio_nnunet_over_student']:.1f}x")
    if args.device == "cuda":
        print(f"  student peak GPU memory {summary['student_peak_mb'] / 1024:.2f} GB (goal <= 2 GB)")


if __name__ == "__main__":
    main()
