"""Helpers shared by all stages (config derived values, case discovery, artifact paths)."""

import functools
import json
import os
import shlex
import sys
import typing

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from workflow_scripts.demo.plan import plan as demo_plan, truth_path
from workflow_scripts.ingest.rounds import (
    RoundsConfigError,
    check_rounds,
    later_rounds,
    retrained_experiments,
    round_c2f,
    round_folder,
)
from workflow_scripts.ingest.students import (
    pseudo_labels_unlabeled,
    training_categories,
    training_threads,
)
from workflow_scripts.io.layout import demo_layout, discover_cases
from workflow_scripts.io.manifest import write_manifest
from workflow_scripts.io.volumes import CASE_ID_PATTERN
from workflow_scripts.labels.merge import category_settings
from workflow_scripts.labels.pseudo import shard_cases
from workflow_scripts.nnunet.dataset import dataset_name
from workflow_scripts.nnunet.training import fold_name, model_folder

# Wildcard constraint of case ids (and of pseudo shards, named after their first case).
CASE_ID = CASE_ID_PATTERN.pattern

RESULTS = config["results"]
LABELS = {entry["id"]: entry for entry in config["labels"]}
# The label map as every stage CLI takes it: --label-map '<JSON of config labels>'.
LABEL_MAP = json.dumps(config["labels"])
# The connected-component cleanup of every prediction (workflow_scripts.labels.postprocess), as JSON.
POSTPROCESS = json.dumps(config["postprocess"])
# The QC stage's geometry tolerances, also for the merge (pseudo vs weak label) and evaluation (prediction vs truth).
GEOMETRY_TOLERANCE_ARGS = (
    f"--spacing-tolerance {config['qc']['spacing_tolerance']}"
    f" --origin-tolerance-mm {config['qc']['origin_tolerance_mm']}"
    f" --direction-tolerance {config['qc']['direction_tolerance']}"
)
# Every script runs as `python -m workflow_scripts.<stage>.<module>`. The package is installed into the project
# venv (pyproject.toml, `make setup`), so nothing is added to PATH or PYTHONPATH: the interpreter is the one running
# Snakemake (the project venv, also inside cluster jobs, which run Snakemake with it). With --use-conda it is the rule
# environment's `python`; those environments hold the pinned dependencies only, so the command names the package's
# folder for that one process.
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    PY = f"PYTHONPATH={shlex.quote(workflow.basedir)} python -m workflow_scripts"
else:
    PY = f"{shlex.quote(sys.executable)} -m workflow_scripts"


def res(*parts):
    """Path of an artifact under the configured results folder."""
    return os.path.join(RESULTS, *parts)


def log_path(rule_name, wildcards_part="all"):
    """A job's log, under the results folder (not the working directory): runs of different configs, or with
    results elsewhere, keep their own logs next to their own outputs."""
    return res("logs", rule_name, f"{wildcards_part}.log")


def bench_path(rule_name, wildcards_part="all"):
    """A job's benchmark table, under the results folder for the same reason as its log."""
    return res("benchmarks", rule_name, f"{wildcards_part}.tsv")


if config["demo"]["enabled"]:
    DATA = demo_layout(RESULTS)
    DEMO_PLAN = demo_plan(config["demo"])
    TRAIN = {
        case: {
            "image": os.path.join(DATA["images"], case + DATA["image_suffix"]),
            "label": (
                None
                if kind == "unlabeled"
                else os.path.join(DATA["labels"], case + DATA["label_suffix"])
            ),
        }
        for case, kind in DEMO_PLAN.train.items()
    }
    TEST = {
        case: {
            "image": os.path.join(DATA["test_images"], case + DATA["image_suffix"]),
            "label": os.path.join(DATA["test_labels"], case + DATA["label_suffix"]),
        }
        for case in DEMO_PLAN.test
    }
else:
    DATA = config["data"]
    TRAIN = {
        c.case: {"image": c.image, "label": c.label}
        for c in discover_cases(
            DATA["images"], DATA["labels"], DATA["image_suffix"], DATA["label_suffix"]
        )
    }
    TEST = {
        c.case: {"image": c.image, "label": c.label}
        for c in discover_cases(
            DATA["test_images"],
            DATA["test_labels"],
            DATA["image_suffix"],
            DATA["label_suffix"],
        )
    }


# Complete truth of training cases, where known (the demo's truthTr, or data.truth): scores the supplemented labels.
if config["demo"]["enabled"]:
    TRUTH = {case: truth_path(RESULTS, case) for case in TRAIN}
elif DATA.get("truth"):
    TRUTH = {
        case: path
        for case in TRAIN
        if os.path.exists(
            path := os.path.join(DATA["truth"], case + DATA["label_suffix"])
        )
    }
else:
    TRUTH = {}


def train_image(wildcards):
    return TRAIN[wildcards.case]["image"]


def train_label(wildcards):
    """The case's label file, or nothing for an unlabeled case."""
    label = TRAIN[wildcards.case]["label"]
    return [] if label is None else label


def accepted_cases():
    """Training cases that passed QC (all of them unless qc.on_error is skip)."""
    table = pd.read_csv(checkpoints.qc_summary.get().output.accepted, sep="\t")
    return list(table["case"])


def labelled_accepted_cases():
    """Accepted training cases that have a label file (known once the QC summary checkpoint has run)."""
    table = pd.read_csv(checkpoints.qc_summary.get().output.accepted, sep="\t")
    return list(table.loc[table["has_label"].astype(bool), "case"])


def qc_label_arg(wildcards, input):
    """The --label option of the QC CLI, empty for an unlabeled case."""
    return f"--label {shlex.quote(input.label)}" if input.label else ""


def split_version():
    """Path and mtime of the split table: the cache key of what is derived from it, since input functions ask for
    it once per case (thousands of times while the DAG is built) and it changes only when the split reruns.
    """
    path = checkpoints.split.get().output.split
    return path, os.stat(path).st_mtime_ns


def cases_by_category(*categories):
    """Accepted training cases of the given split categories (strong / weak / unlabeled), in split order."""
    return list(_cases_by_category(split_version(), categories))


@functools.lru_cache(maxsize=32)
def _cases_by_category(version, categories):
    table = _split_table(version)
    return tuple(table.loc[table["category"].isin(categories), "case"])


def case_category(case):
    """The split category of an accepted training case."""
    return _case_categories(split_version())[case]


@functools.lru_cache(maxsize=4)
def _case_categories(version):
    table = _split_table(version)
    return dict(zip(table["case"], table["category"]))


@functools.lru_cache(maxsize=4)
def _split_table(version):
    return pd.read_csv(version[0], sep="\t")


def all_targets():
    """Everything `snakemake` builds by default; each stage's rule file adds its final artifacts."""
    return [target for stage_targets in TARGETS.values() for target in stage_targets]


TARGETS = {}


def test_shards(shard_size):
    """Test cases in fixed shards: a prediction job loads its model once and writes one file per case."""
    return case_shards(TEST, shard_size)


def case_shards(cases, shard_size):
    """Cases (sorted) in fixed shards of ``shard_size``, named 0000, 0001, ..."""
    cases = sorted(cases)
    return {
        f"{start // shard_size:04d}": cases[start : start + shard_size]
        for start in range(0, len(cases), shard_size)
    }


def prediction_dir(experiment):
    """Test-set predictions of an experiment: the teacher's own, or a student's."""
    if experiment == "teacher":
        return res("teacher", "pred")
    return res("student", experiment, "pred")


def shard_size_of(experiment):
    return config["pseudo" if experiment == "teacher" else "student"]["shard_size"]


def prediction_files(experiment, cases=None):
    """Per-case predictions of an experiment on the test set (or on the given test cases)."""
    return [
        os.path.join(prediction_dir(experiment), f"{case}.nii.gz")
        for case in (sorted(TEST) if cases is None else cases)
    ]


def box_tables(experiment):
    """Per-shard tables of the c2f student's fine-stage boxes, written next to its predictions."""
    return [
        os.path.join(prediction_dir(experiment), "boxes", f"{shard}.tsv")
        for shard in test_shards(shard_size_of(experiment))
    ]


def efficiency_tables(experiment):
    """Per-shard efficiency tables written next to the predictions (columns: Name, Time, MaxGPU_Mem,
    AUC_GPU_Time, ImageSize, MemoryKind)."""
    return [
        os.path.join(prediction_dir(experiment), "efficiency", f"{shard}.tsv")
        for shard in test_shards(shard_size_of(experiment))
    ]


# What the students train on (workflow_scripts/ingest/students.py): the split categories of each experiment (strong
# and weak; unlabeled too with unlabeled: true), and whether the unlabeled cases are pseudo-labelled and merged
# (pseudo.include_unlabeled: true, or null and some experiment trains on them). A contradiction (unlabeled: true with
# raw labels, or with include_unlabeled: false) stops planning here, before any job runs.
TRAINING_CATEGORIES = {
    name: training_categories(name, experiment)
    for name, experiment in config["student"]["experiments"].items()
}
PSEUDO_UNLABELED = pseudo_labels_unlabeled(
    config["pseudo"]["include_unlabeled"], TRAINING_CATEGORIES
)


# Scheduling priority of the jobs between the teacher and the students' training (pseudo-labels, merge, training
# manifests, student training): on a few cores a free core first goes to them, not to a test-set prediction or an
# evaluation that nothing waits for. Measured in the demo on 2 cores: the second pseudo-label shard waited 19 s behind
# the teacher's test-set prediction, and with it the merge and the two_stage student.
TRAINING_PATH_PRIORITY = 10
# The teacher's chain (dataset, preprocessing, plans, training) comes before even those: everything the two_stage
# student needs waits for it, while a baseline student (raw labels) does not; with equal priorities a many-core
# machine could start a baseline that takes the cores the teacher asks for.
TEACHER_PATH_PRIORITY = 20


# Pseudo-labels (rules/pseudo.smk).
def pseudo_shards():
    """Shards of the cases to pseudo-label (name -> cases; shared, do not modify). Weak and unlabeled cases are
    sharded separately, so pseudo-labelling the unlabeled ones (PSEUDO_UNLABELED) adds shards instead of moving weak
    cases into other ones. Computed once per split table (pseudo_case asks once per case).
    """
    return _pseudo_shards(split_version())


@functools.lru_cache(maxsize=4)
def _pseudo_shards(version):
    categories = ["weak"] + (["unlabeled"] if PSEUDO_UNLABELED else [])
    shards = {}
    for category in categories:
        shards.update(
            shard_cases(cases_by_category(category), config["pseudo"]["shard_size"])
        )
    return shards


def pseudo_labelled_cases():
    """Cases that get a pseudo-label (weak, and unlabeled with PSEUDO_UNLABELED)."""
    return [case for cases in pseudo_shards().values() for case in cases]


def with_truth(cases):
    """The cases whose complete truth is known (TRUTH): the ones the label-quality tables score."""
    return [case for case in cases if case in TRUTH]


# Merged labels (rules/merge.smk), also what the student stages train on.
def merged_label_cases():
    """Cases that get a merged label: strong, weak and, with PSEUDO_UNLABELED, unlabeled."""
    unlabeled = ["unlabeled"] if PSEUDO_UNLABELED else []
    return cases_by_category("strong", "weak", *unlabeled)


def merged_label_files(wildcards=None):
    """Input function: the merged label of every case that has one."""
    return [res("merged", f"{case}.nii.gz") for case in merged_label_cases()]


def merge_setting(case, key):
    """min_confidence or low_confidence_as of the case's merge: the unlabeled cases' own values where set
    (merge.unlabeled_*), so changing them re-merges only the unlabeled cases."""
    index = {"min_confidence": 0, "low_confidence_as": 1}[key]
    return category_settings(config["merge"], case_category(case))[index]


def training_label(case, source):
    """The label a student trains on: the merged label (source "merged") or the raw label as annotated ("raw")."""
    if source == "merged":
        return res("merged", f"{case}.nii.gz")
    if source == "raw" and TRAIN[case]["label"] is not None:
        return TRAIN[case]["label"]
    if source == "raw":
        raise ValueError(f"case {case!r} is unlabeled: it has no raw label")
    raise ValueError(f"label source must be 'merged' or 'raw', got {source!r}")


def runtime_by_attempt(minutes):
    """Runtime in minutes that grows with each retry: a training killed at its time limit resumes from its
    checkpoint with more time, instead of being killed at the same point again."""
    return lambda wildcards, attempt: minutes * attempt


# Test-set predictions, one rule per shard of test cases (teacher_predict_<shard>, student_predict_<shard>,
# student_nnunet_predict_<shard>): the model is loaded once per shard and every case still gets its own file. Shards
# are fixed when the workflow is parsed, so each is a rule of its own; this gives each one its name and files.
class PredictionShard(typing.NamedTuple):
    name: str  # the rule name
    cases: str  # the shard's case ids, space-separated for the CLI
    images: list
    predictions: list
    efficiency: str
    boxes: str  # the c2f student's per-case fine-stage boxes (workflow_scripts.c2f.predict)
    log: str
    benchmark: str


def prediction_shards(
    rule_prefix, pred_dir, shard_size, wildcards_prefix="", images=None
):
    """The prediction shards of one predictor writing into ``pred_dir`` (which may hold an {experiment} wildcard,
    then given again as ``wildcards_prefix`` of the log and benchmark names). ``images`` (case -> image) are the
    cases to predict: the test set by default, new scans for rules/predict.smk."""
    if images is None:
        images = {case: entry["image"] for case, entry in TEST.items()}
    for shard, cases in case_shards(images, shard_size).items():
        yield PredictionShard(
            name=f"{rule_prefix}_{shard}",
            cases=" ".join(cases),
            images=[images[case] for case in cases],
            predictions=[os.path.join(pred_dir, f"{case}.nii.gz") for case in cases],
            efficiency=os.path.join(pred_dir, "efficiency", f"{shard}.tsv"),
            boxes=os.path.join(pred_dir, "boxes", f"{shard}.tsv"),
            log=log_path(rule_prefix, f"{wildcards_prefix}{shard}"),
            benchmark=bench_path(rule_prefix, f"{wildcards_prefix}{shard}"),
        )


# The coarse-to-fine student experiments (rules/student.smk trains them, rules/learning.smk measures them):
# experiment -> label source ("merged" / "raw").
C2F_LABELS = {
    name: experiment["labels"]
    for name, experiment in config["student"]["experiments"].items()
    if experiment.get("model", "c2f") == "c2f"
}
C2F_EXPERIMENTS = list(C2F_LABELS)
# restricts the c2f rules' {experiment} wildcard so they never compete with the nnU-Net student's rules
C2F_PATTERN = "|".join(C2F_EXPERIMENTS) or "(?!)"


# Student training sets (rules/student.smk, rules/student_nnunet.smk): the cases of the experiment's categories
# (TRAINING_CATEGORIES) with the label of its source, written to a manifest table by workflow_scripts.io.manifest.
# An experiment without unlabeled cases asks for exactly the files it asked for before, so switching them on for
# one experiment reruns no other.
def student_label_source(experiment):
    return config["student"]["experiments"][experiment]["labels"]


def student_train_threads(wildcards):
    return training_threads(
        config["student"]["experiments"][wildcards.experiment],
        config["student"]["threads"],
    )


def student_training_cases(experiment):
    return cases_by_category(*TRAINING_CATEGORIES[experiment])


def student_training_images(wildcards):
    return [
        TRAIN[case]["image"] for case in student_training_cases(wildcards.experiment)
    ]


def student_training_labels(wildcards):
    source = student_label_source(wildcards.experiment)
    return [
        training_label(case, source)
        for case in student_training_cases(wildcards.experiment)
    ]


def write_student_manifest(experiment, path, images, labels):
    """The manifest of an experiment: its cases, images and labels (the rule's inputs) and split categories."""
    cases = student_training_cases(experiment)
    write_manifest(path, cases, images, labels, [case_category(c) for c in cases])


def student_low_confidence_as(experiment):
    """low_confidence_as of every pseudo-labelled category the experiment trains on: whether its merged labels can
    hold the ignore label (the nnU-Net student declares it then)."""
    return sorted(
        category_settings(config["merge"], category)[1]
        for category in TRAINING_CATEGORIES[experiment]
        if category != "strong"
    )


# The teacher's nnU-Net model: rules/teacher.smk trains it and predicts the test set, rules/pseudo.smk pseudo-labels
# with it.
TEACHER = config["teacher"]
TEACHER_ROOT = res("teacher", "nnunet")
TEACHER_DATASET = dataset_name(TEACHER["dataset_id"], "Teacher")
TEACHER_MODEL = str(
    model_folder(
        TEACHER_ROOT, TEACHER_DATASET, TEACHER["planner"], TEACHER["configuration"]
    )
)
TEACHER_FOLD = os.path.join(TEACHER_MODEL, fold_name(TEACHER["fold"]))
TEACHER_CHECKPOINT = os.path.join(TEACHER_FOLD, "checkpoint_final.pth")

# Evaluated experiments (rules/evaluation.smk, rules/report.smk): the student experiments plus the teacher, whose
# own test-set predictions are scored the same way.
EVAL_EXPERIMENTS = list(dict.fromkeys(config["eval"]["experiments"] + ["teacher"]))
TEST_CASES = sorted(TEST)


# Prediction on new scans (rules/predict.smk): the model files each kind of model is applied from.
def predict_model_checkpoints(model):
    """The trained model files that predicting with ``model`` (a student experiment or "teacher") reads; the
    nnU-Net students' (NNUNET_*) are defined in rules/student_nnunet.smk, included before this is called.
    """
    if model == "teacher":
        return [TEACHER_CHECKPOINT]
    if model in C2F_LABELS:
        return [res("student", model, "model", "model_final.pt")]
    if model in NNUNET_DATASETS:
        return expand(
            NNUNET_CHECKPOINT,
            experiment=model,
            dataset=NNUNET_DATASETS[model],
            batch=NNUNET_STUDENT["batch_sizes"],
        )
    raise ValueError(
        f"config predict.model {model!r} is neither 'teacher' nor a student experiment"
        f" (student.experiments: {sorted(config['student']['experiments'])})"
    )


# Test cases with a label are scored; the others (real test sets often hold scans nobody annotated) are predicted
# like every test case, and the evaluation names them as not scored.
SCORED_TEST_CASES = [case for case in TEST_CASES if TEST[case]["label"] is not None]
UNSCORED_TEST_CASES = [case for case in TEST_CASES if TEST[case]["label"] is None]


def scored_test_labels(wildcards=None):
    """Input function: the label of every scored test case. Without any, a rule that scores is an error naming the
    folder (the default targets leave those rules out then, see evaluation.smk)."""
    if not SCORED_TEST_CASES:
        raise ValueError(
            f"no test image has a label in {DATA['test_labels']!r} (config data.test_labels): nothing to score"
        )
    return [TEST[case]["label"] for case in SCORED_TEST_CASES]


# Later rounds (rules/rounds.smk, README "Rounds"): who is retrained, the {round} wildcard's values, what the merge
# fills, and where a round's files live.

ROUNDS = config["rounds"]
ROUND_EXPERIMENTS = retrained_experiments(config["student"]["experiments"])
check_rounds(ROUNDS, ROUND_EXPERIMENTS, config["student"]["c2f"])
LATER_ROUNDS = later_rounds(ROUNDS["count"])
if LATER_ROUNDS:
    # the schema sees rounds.c2f as a free object: the later rounds' student settings are validated as round 1's
    try:
        validate(
            {"student": {"c2f": round_c2f(config["student"]["c2f"], ROUNDS, 2)}},
            schema="../config/schema.yaml",
            set_default=False,
        )
    except WorkflowError as err:
        raise RoundsConfigError(f"config rounds.c2f: {err}") from None
# restricts the {round} wildcard to the configured later rounds (nothing matches with count 1)
ROUND_PATTERN = "|".join(str(k) for k in LATER_ROUNDS) or "(?!)"
ROUND_EXPERIMENT_PATTERN = "|".join(ROUND_EXPERIMENTS) or "(?!)"
ROUND_FILL_CLASSES = (
    config["teacher"]["classes"]
    if ROUNDS["fill_classes"] is None
    else ROUNDS["fill_classes"]
)
# the students evaluated in every round: retrained ones that eval.experiments names
ROUND_EVAL_EXPERIMENTS = [
    e for e in ROUND_EXPERIMENTS if e in config["eval"]["experiments"]
]


def round_res(round_number, *parts):
    """Path of an artifact of a round: round 1's where it always was, later rounds' under round<k>/."""
    return res(round_folder(int(round_number)), *parts)


def round_model(round_number, experiment):
    """A c2f student's trained model in a round."""
    return round_res(round_number, "student", experiment, "model", "model_final.pt")


def round_c2f_setting(round_number, key):
    """A student.c2f setting as the round's student was trained (and is applied) with."""
    return round_c2f(config["student"]["c2f"], ROUNDS, int(round_number))[key]
