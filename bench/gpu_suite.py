"""The GPU check: every GPU-relevant measurement of the project in one run, with one summary file.

Run it through ``bench/gpu_suite.sh`` (which picks the interpreter and the import path). Steps, in this order, each
in its own process with its own time limit, so a crash, a CUDA error or a hang costs only its own rows:

- ``env``: GPU name, driver, Python, torch / CUDA / cuDNN, and the key packages' versions against requirements.lock;
- ``nvml``: the efficiency sampler (``evaluation.efficiency``) around a known allocation: what it sampled (``gpu`` =
  this process on its GPU), the GPU's bus id against torch's, NVML's and torch's peaks;
- ``c2f_train``: the coarse-to-fine student's training loop (fp16 autocast and gradient scaling on CUDA) at
  config/gpu_demo.yaml's sizes, a few iterations;
- ``nnunet_train``: the nnU-Net student's training (the teacher's trainer too: one code path), nnU-Net's planned
  3d_fullres with its own fp16 AMP, a few iterations and its final validation;
- ``pseudo_label_speed``: ``bench/pseudo_label_speed.py --device cuda --shape 512 512 100`` (ours vs nnU-Net);
- ``student_speed``: ``bench/student_speed.py --device cuda --shape 512 512 300`` (student vs nnU-Net).

``--device cpu --quick`` runs the same steps on tiny shapes with few iterations (tests/test_gpu_suite.py). The summary
``<out>/gpu_suite.tsv`` has one row per (step, metric, value): every step's ``status`` (``ok``, ``failed (exit N)``,
``timeout after N s``, ``skipped (budget)``), its ``seconds`` and its measurements; ``<out>/gpu_suite.log`` holds
every step's output. nnU-Net's torch.compile is off (``nnUNet_compile=false`` unless set): compiling would take
minutes of the budget, and inference never compiles. Nothing is installed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "nvml", "c2f_train", "nnunet_train", "pseudo_label_speed", "student_speed")
IN_PROCESS = ("env", "nvml", "c2f_train", "nnunet_train")  # steps this script runs itself (``--step``)
# seconds each step may take on an H200 machine (estimates: its time is measured by the suite itself)
LIMITS_S = {"env": 90, "nvml": 90, "c2f_train": 150, "nnunet_train": 210, "pseudo_label_speed": 300,
            "student_speed": 330}
QUICK_LIMIT_S = 300
BUDGET_S = 690  # the whole suite: <= 11.5 min
# packages whose installed version the env step compares with requirements.lock (import name: distribution)
KEY_PACKAGES = ("torch", "numpy", "scipy", "pandas", "nnunetv2", "SimpleITK", "connected-components-3d",
                "batchgeneratorsv2", "dynamic-network-architectures", "nvidia-ml-py", "psutil")
NNUNET_DATASET_ID = 985
QUICK_C2F = {"coarse_size": [16, 24, 24], "fine_size": [16, 32, 32], "channels": [4, 8], "coarse_channels": [4, 8]}


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    limit_s: float
    result: Path  # the JSON the step writes its measurements to


def plan_steps(device: str, quick: bool, threads: int, work: Path, names: Sequence[str] = STEPS) -> list[Step]:
    """The command of every step in ``names`` (kept in :data:`STEPS` order)."""
    python = sys.executable
    steps = []
    for name in (n for n in STEPS if n in names):
        result = work / f"{name}.json"
        if name in IN_PROCESS:
            command = [python, str(Path(__file__).resolve()), "--step", name, "--device", device, "--threads",
                       str(threads), "--work", str(work), "--result", str(result), *(["--quick"] if quick else [])]
        elif name == "pseudo_label_speed":
            sizes = (["--shape", "32", "32", "16", "--cases", "1", "--train-cases", "2", "--epochs", "1",
                      "--iterations", "2", "--skip-nnunet"] if quick
                     else ["--shape", "512", "512", "100", "--cases", "3"])
            command = [python, str(REPO / "bench" / "pseudo_label_speed.py"), "--device", device, *sizes,
                       "--threads", str(min(threads, 8)), "--summary", str(result)]
        else:  # student_speed
            sizes = (["--shape", "32", "32", "16", "--cases", "1", "--skip-nnunet", "--c2f", json.dumps(QUICK_C2F)]
                     if quick else ["--shape", "512", "512", "300", "--cases", "2"])
            command = [python, str(REPO / "bench" / "student_speed.py"), "--device", device, *sizes,
                       "--threads", str(threads), "--summary", str(result)]
        steps.append(Step(name, command, QUICK_LIMIT_S if quick else LIMITS_S[name], result))
    return steps


def format_value(value: object) -> str:
    """A summary cell: numbers with 6 significant digits, lists and dicts as JSON, the rest as text."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def summary_rows(step: str, status: str, seconds: float, measurements: Mapping[str, object]) -> list[list[str]]:
    """The summary rows of one step: status, seconds, then its measurements in their order."""
    return [[step, "status", status], [step, "seconds", format_value(seconds)],
            *([step, key, format_value(value)] for key, value in measurements.items())]


def run_step(step: Step, limit_s: float, log: Path, env: Mapping[str, str]) -> tuple[str, float, dict]:
    """Run one step, appending its output to ``log``; returns (status, seconds, measurements)."""
    with log.open("a") as out:
        out.write(f"\n===== {step.name}: {' '.join(step.command)}\n")
        out.flush()
        start = time.perf_counter()
        try:
            code = subprocess.run(step.command, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
                                  timeout=limit_s).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {limit_s:.0f} s"
        seconds = time.perf_counter() - start
    measurements = json.loads(step.result.read_text()) if step.result.is_file() else {}
    return status, seconds, measurements


def run_suite(args: argparse.Namespace) -> int:
    """Every selected step within the budget; writes the summary and returns 0 when every step is ok."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, summary = out / "gpu_suite.log", out / "gpu_suite.tsv"
    log.write_text("")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("nnUNet_compile", "false")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, as the training CLIs set it
    names = args.steps.split(",")
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; steps are {list(STEPS)}")
    rows = [["step", "metric", "value"]]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        deadline = time.perf_counter() + args.budget_s
        for step in plan_steps(args.device, args.quick, args.threads, work, names):
            step.result.unlink(missing_ok=True)
            left = deadline - time.perf_counter()
            if left < 5:
                status, seconds, measurements = "skipped (budget)", 0.0, {}
            else:
                status, seconds, measurements = run_step(step, min(step.limit_s, left), log, env)
            ok &= status == "ok"
            rows += summary_rows(step.name, status, seconds, measurements)
            print(f"{step.name:20s} {status:24s} {seconds:7.1f} s", flush=True)
            summary.write_text("".join("\t".join(row) + "\n" for row in rows))  # complete after every step
    print(f"\nsummary: {summary}   log: {log}\n")
    print(summary.read_text())
    return 0 if ok else 1


# --- the steps this script runs itself ---------------------------------------------------------------------------

def normalised(name: str) -> str:
    """A distribution name as pip compares them (case, '_' and '.' do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_versions(lock: Path = REPO / "requirements.lock") -> dict[str, str]:
    """Pinned versions from requirements.lock (name==version lines), by normalised name."""
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[normalised(name)] = version.split(";")[0].strip()
    return pins


def step_env(args: argparse.Namespace) -> dict:
    """Machine and package versions; fails when a package the steps import is missing."""
    from importlib import metadata

    import torch

    info: dict = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda or "none", "cuda_available": torch.cuda.is_available()}
    if args.device == "cuda":
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=properties.name, gpu_memory_gb=properties.total_memory / 2**30,
                    cudnn=torch.backends.cudnn.version(), visible_gpus=torch.cuda.device_count())
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as err:  # noqa: BLE001 - recorded; the nvml step tests the sampler itself
            info["driver"] = f"NVML failed: {err}"
    else:
        info["gpu"] = "none"
    pins = lock_versions()
    missing = []
    for package in KEY_PACKAGES:
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "missing"
            missing.append(package)
        pinned = pins.get(normalised(package), "?")
        info[f"version:{package}"] = installed if installed == pinned else f"{installed} (lock {pinned})"
    if missing:
        info["error"] = (f"missing packages {missing}: build their wheels with ../shared/device/wheelhouse.sh "
                         f"NAME==VERSION (versions from requirements.lock) and put them on PYTHONPATH")
    return info


def step_nvml(args: argparse.Namespace) -> dict:
    """The efficiency sampler around a known allocation (1 GiB on CUDA, 64 MiB of host memory on CPU)."""
    import numpy as np
    import torch

    from workflow_scripts.evaluation.efficiency import ResourceSampler, torch_cuda_device

    size_mb = 1024 if args.device == "cuda" else 64
    with ResourceSampler(args.device, 0.05) as sampler:
        if args.device == "cuda":
            block = torch.ones(size_mb * 2**20, dtype=torch.uint8, device="cuda")
            torch.cuda.synchronize()
        else:
            block = np.ones(size_mb * 2**20 // 8)
        time.sleep(0.3)
    del block
    usage = sampler.usage
    result: dict = {"allocated_mb": size_mb, "memory_kind": usage.memory_kind, "peak_mb": usage.peak_mem_mb,
                    "torch_peak_mb": usage.torch_peak_mb, "gpu_bus_id": usage.gpu_bus_id}
    problems = []
    if args.device == "cuda":
        result["torch_bus_id"] = torch_cuda_device("cuda").location.bus_id
        if usage.memory_kind == "rss":
            problems.append("NVML could not sample the GPU (see the warning above)")
        if usage.gpu_bus_id != result["torch_bus_id"]:
            problems.append(f"sampled GPU {usage.gpu_bus_id} is not torch's {result['torch_bus_id']}")
        if not usage.torch_peak_mb >= size_mb:
            problems.append(f"torch peak {usage.torch_peak_mb:.0f} MB < the {size_mb} MB allocated")
    elif usage.memory_kind != "rss":
        problems.append(f"memory kind {usage.memory_kind} on CPU")
    if not usage.peak_mem_mb >= size_mb:
        problems.append(f"peak {usage.peak_mem_mb:.0f} MB < the {size_mb} MB allocated")
    if problems:
        result["error"] = "; ".join(problems)
    return result


def synthetic_cases(work: Path, quick: bool, n_cases: int) -> tuple[dict, list]:
    """The configuration (config/gpu_demo.yaml, or the tiny test config when quick) and ``n_cases`` synthetic
    fully labelled training cases at its demo shape, written once under ``work`` and shared by the training steps."""
    import yaml

    from workflow_scripts.demo.dataset import DemoParams, flare_ids, generate_case
    from workflow_scripts.io.config_defaults import config_with_defaults
    from workflow_scripts.io.manifest import TrainingCase
    from workflow_scripts.io.volumes import write_volume

    source = REPO / ("tests/tiny_config.yaml" if quick else "config/gpu_demo.yaml")
    config = config_with_defaults(yaml.safe_load(source.read_text()))
    params = DemoParams.from_config({**config["demo"], "shape_jitter": 0.0})
    organ_ids, lesion_id = flare_ids(config["labels"])
    folder = work / "cases"
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n_cases):
        name = f"suite_{i:03d}"
        image, label = folder / f"{name}_0000.nii.gz", folder / f"{name}.nii.gz"
        if not label.is_file():
            case = generate_case(name, "test", params, organ_ids, lesion_id)
            write_volume(image, case.image, case.geometry)
            write_volume(label, case.truth, case.geometry)
        cases.append(TrainingCase(name, str(image), str(label)))
    return config, cases


def step_c2f_train(args: argparse.Namespace) -> dict:
    """A few iterations of the c2f student's training on ``args.device`` (fp16 autocast and GradScaler on CUDA)."""
    import torch

    from workflow_scripts.c2f import train as c2f_train
    from workflow_scripts.c2f.model import StudentSpec, autocast

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config, cases = synthetic_cases(args.work, args.quick, 2 if args.quick else 4)
    schedule = {"epochs": 1 if args.quick else 2, "iterations_per_epoch": 2 if args.quick else 10,
                "warmup_epochs": 0, "checkpoint_every": 1, "val_fraction": 0.5 if args.quick else 0.25}
    c2f = {**config["student"]["c2f"], **(QUICK_C2F if args.quick else {}), **schedule}
    spec = StudentSpec.from_config(c2f, [entry["id"] for entry in config["labels"]])
    settings = c2f_train.TrainSettings.from_config(c2f)
    folder = args.work / "c2f"
    c2f_train.prepare_all(cases, spec, settings.train_margin_max_mm, None, folder / "cache")
    data_s = time.perf_counter() - start
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rows = c2f_train.train(cases, spec, settings, None, folder, folder / "model.pt", folder / "log.tsv", args.device)
    train_s = time.perf_counter() - start
    iterations = settings.epochs * settings.iterations_per_epoch
    _, fine = spec.build()
    with torch.no_grad(), autocast(device, settings.amp):
        output = fine.to(device)(torch.zeros(1, 1, *spec.fine_size, device=device))
    result = {"cases": len(cases), "shape_zyx": list(config["demo"]["shape"]), "fine_size": list(spec.fine_size),
              "batch_size": settings.batch_size, "amp": settings.amp, "autocast_output_dtype": str(output.dtype),
              "iterations": iterations, "data_s": data_s, "train_s": train_s,
              "s_per_iteration": sum(row["seconds"] for row in rows) / iterations, "final_loss": rows[-1]["loss"],
              "val_dice_fine": rows[-1]["val_dice_fine"],
              "torch_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else math.nan}
    if not math.isfinite(result["final_loss"]):
        result["error"] = f"loss {result['final_loss']}"
    if device.type == "cuda" and settings.amp == "fp16" and output.dtype != torch.float16:
        result["error"] = f"fp16 autocast gave {output.dtype}"
    return result


def step_nnunet_train(args: argparse.Namespace) -> dict:
    """A few iterations of the nnU-Net student's training (nnU-Net's own AMP on CUDA) and its final validation."""
    from workflow_scripts.nnunet import student
    from workflow_scripts.nnunet.ext import configure_environment
    from workflow_scripts.nnunet.training import custom_plans_identifier, plan_and_preprocess

    root = args.work / "nnunet"
    configure_environment(root, args.threads)  # before anything imports nnunetv2
    import torch

    planner, configuration, batch = "ExperimentPlanner", "3d_fullres", 2
    start = time.perf_counter()
    config, cases = synthetic_cases(args.work, args.quick, 2 if args.quick else 4)
    name = student.student_dataset_name(NNUNET_DATASET_ID, "gpu_suite")
    student.build_student_dataset(cases, root / "raw" / name, config["labels"], with_ignore=False)
    base = plan_and_preprocess(root, NNUNET_DATASET_ID, planner, configuration, args.threads)
    epochs, iterations = (1, 2) if args.quick else (2, 10)
    settings = {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
                "num_val_iterations_per_epoch": 1 if args.quick else 2, "save_every": epochs}
    patch, features = (([16, 32, 32], [4, 8, 16]) if args.quick else (None, None))
    plans = student.student_plans(json.loads(base.read_text()), planner, configuration, settings, [batch], patch,
                                  features)
    (base.parent / f"{custom_plans_identifier(planner)}.json").write_text(json.dumps(plans))
    plan_s = time.perf_counter() - start
    start = time.perf_counter()
    checkpoint = student.train_model(root, NNUNET_DATASET_ID, planner, configuration, batch, "all", args.device,
                                     args.threads)
    train_s = time.perf_counter() - start
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    logged = state["logging"]
    epoch_s = [end - begin for begin, end in zip(logged["epoch_start_timestamps"], logged["epoch_end_timestamps"])]
    used = plans["configurations"][f"{student.batch_configuration(configuration, batch)}_wf"]
    planned = plans["configurations"][configuration]
    result = {"cases": len(cases), "batch_size": batch, "patch_size": used.get("patch_size", planned["patch_size"]),
              "iterations": epochs * iterations, "amp_grad_scaler": state["grad_scaler_state"] is not None,
              "torch_compile": os.environ.get("nnUNet_compile", ""), "plan_s": plan_s,
              "train_and_validation_s": train_s, "s_per_epoch": epoch_s[-1], "final_loss": logged["train_losses"][-1],
              "val_dice": logged["mean_fg_dice"][-1]}
    if not math.isfinite(result["final_loss"]):
        result["error"] = f"loss {result['final_loss']}"
    if args.device == "cuda" and not result["amp_grad_scaler"]:
        result["error"] = "nnU-Net trained without its fp16 grad scaler on CUDA"
    return result


def run_in_process_step(args: argparse.Namespace) -> int:
    """One of :data:`IN_PROCESS`; its measurements go to ``--result`` (an ``error`` key fails the step)."""
    args.work = Path(args.work)
    result = {"env": step_env, "nvml": step_nvml, "c2f_train": step_c2f_train,
              "nnunet_train": step_nnunet_train}[args.step](args)
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (a check of the suite)")
    parser.add_argument("--out", default=str(REPO / "results" / "gpu_suite"),
                        help="folder of gpu_suite.tsv and gpu_suite.log")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-time budget of the whole suite")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads and workers")
    parser.add_argument("--work", help="keep synthetic data and models here (default: a temporary folder)")
    parser.add_argument("--step", choices=IN_PROCESS, help=argparse.SUPPRESS)  # internal: run one step here
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return run_in_process_step(args) if args.step else run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
