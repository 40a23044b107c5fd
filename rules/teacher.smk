# Rules of the teacher stage: nnU-Net v2 trained on the strong cases (workflow_scripts/nnunet/teacher.py).
# nnU-Net's folders live under results/teacher/nnunet/{raw,preprocessed,results}; its environment variables are
# set inside each job (workflow_scripts/nnunet/ext.configure_environment), never globally. Training declares only
# checkpoint_final.pth and the validation summary: checkpoint_latest.pth next to them is left undeclared, so
# Snakemake keeps it when a job is killed and the rerun continues from it.

import json

from workflow_scripts.nnunet.dataset import dataset_name
from workflow_scripts.nnunet.training import (
    PLANS_IDENTIFIERS,
    custom_plans_identifier,
    fold_name,
    model_folder,
)

TEACHER = config["teacher"]
TEACHER_ROOT = res("teacher", "nnunet")
TEACHER_DATASET = dataset_name(TEACHER["dataset_id"], "Teacher")
TEACHER_PREPROCESSED = os.path.join(TEACHER_ROOT, "preprocessed", TEACHER_DATASET)
TEACHER_MODEL = str(
    model_folder(
        TEACHER_ROOT, TEACHER_DATASET, TEACHER["planner"], TEACHER["configuration"]
    )
)
TEACHER_FOLD = os.path.join(TEACHER_MODEL, fold_name(TEACHER["fold"]))
TEACHER_CHECKPOINT = os.path.join(TEACHER_FOLD, "checkpoint_final.pth")
TEACHER_ARGS = (
    f"--root {shlex.quote(TEACHER_ROOT)} --dataset-id {TEACHER['dataset_id']}"
    f" --planner {TEACHER['planner']} --configuration {TEACHER['configuration']}"
)


rule teacher_dataset:
    input:
        images=lambda wildcards: [
            TRAIN[case]["image"] for case in cases_by_category("strong")
        ],
        labels=lambda wildcards: [
            TRAIN[case]["label"] for case in cases_by_category("strong")
        ],
    output:
        os.path.join(TEACHER_ROOT, "raw", TEACHER_DATASET, "dataset.json"),
    log:
        log_path("teacher_dataset"),
    benchmark:
        bench_path("teacher_dataset")
    conda:
        "../envs/nnunet.yaml"
    threads: 1
    resources:
        mem_mb=config["pseudo"]["mem_mb"],
        runtime=TEACHER["runtime"],
    params:
        py=PY,
        cases=lambda wildcards: " ".join(cases_by_category("strong")),
        classes=" ".join(str(c) for c in TEACHER["classes"]),
        labels=json.dumps(config["labels"]),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "{params.py}.nnunet.dataset --cases {params.cases} --images {input.images:q}"
        " --labels {input.labels:q} --classes {params.classes} --label-map {params.labels:q}"
        " --out {params.out:q} > {log:q} 2>&1"


rule teacher_preprocess:
    input:
        os.path.join(TEACHER_ROOT, "raw", TEACHER_DATASET, "dataset.json"),
    output:
        os.path.join(
            TEACHER_PREPROCESSED, f"{PLANS_IDENTIFIERS[TEACHER['planner']]}.json"
        ),
    log:
        log_path("teacher_preprocess"),
    benchmark:
        bench_path("teacher_preprocess")
    conda:
        "../envs/nnunet.yaml"
    threads: TEACHER["threads"]
    resources:
        mem_mb=TEACHER["mem_mb"],
        runtime=TEACHER["runtime"],
    params:
        py=PY,
        args=TEACHER_ARGS,
    shell:
        "{params.py}.nnunet.teacher preprocess {params.args} --threads {threads}"
        " --expect {output:q} > {log:q} 2>&1"


rule teacher_configure:
    input:
        os.path.join(
            TEACHER_PREPROCESSED, f"{PLANS_IDENTIFIERS[TEACHER['planner']]}.json"
        ),
    output:
        os.path.join(
            TEACHER_PREPROCESSED, f"{custom_plans_identifier(TEACHER['planner'])}.json"
        ),
    log:
        log_path("teacher_configure"),
    benchmark:
        bench_path("teacher_configure")
    conda:
        "../envs/nnunet.yaml"
    threads: 1
    resources:
        mem_mb=config["pseudo"]["mem_mb"],
        runtime=TEACHER["runtime"],
    params:
        py=PY,
        args=TEACHER_ARGS,
        overrides=" ".join(
            f"--{key.replace('_', '-')} {' '.join(str(v) for v in TEACHER[key])}"
            for key in ("patch_size", "features_per_stage")
            if TEACHER[key] is not None
        )
        + (
            f" --batch-size {TEACHER['batch_size']}"
            if TEACHER["batch_size"] is not None
            else ""
        ),
        schedule=(
            f"--epochs {TEACHER['epochs']}"
            f" --iterations-per-epoch {TEACHER['iterations_per_epoch']}"
            f" --val-iterations {TEACHER['val_iterations']}"
            f" --checkpoint-every {TEACHER['checkpoint_every']}"
        ),
    shell:
        "{params.py}.nnunet.teacher configure {params.args} --base-plans {input:q}"
        " {params.overrides} {params.schedule} --output {output:q} > {log:q} 2>&1"


rule teacher_train:
    input:
        os.path.join(
            TEACHER_PREPROCESSED, f"{custom_plans_identifier(TEACHER['planner'])}.json"
        ),
    output:
        checkpoint=TEACHER_CHECKPOINT,
        summary=os.path.join(TEACHER_FOLD, "validation", "summary.json"),
    log:
        log_path("teacher_train"),
    benchmark:
        bench_path("teacher_train")
    conda:
        "../envs/nnunet.yaml"
    threads: TEACHER["threads"]
    resources:
        mem_mb=TEACHER["mem_mb"],
        runtime=runtime_by_attempt(TEACHER["runtime"]),
        gpu=int(config["device"] == "cuda"),
    params:
        py=PY,
        args=TEACHER_ARGS,
        fold=TEACHER["fold"],
        device=config["device"],
    shell:
        "{params.py}.nnunet.teacher train {params.args} --fold {params.fold}"
        " --device {params.device} --threads {threads}"
        " --expect {output.checkpoint:q} > {log:q} 2>&1"


rule teacher_validation:
    input:
        summary=os.path.join(TEACHER_FOLD, "validation", "summary.json"),
        dataset=os.path.join(TEACHER_ROOT, "raw", TEACHER_DATASET, "dataset.json"),
    output:
        res("teacher", "validation.tsv"),
    log:
        log_path("teacher_validation"),
    benchmark:
        bench_path("teacher_validation")
    conda:
        "../envs/nnunet.yaml"
    threads: 1
    resources:
        mem_mb=config["pseudo"]["mem_mb"],
        runtime=TEACHER["runtime"],
    params:
        py=PY,
        labels=json.dumps(config["labels"]),
        fold=TEACHER["fold"],
    shell:
        "{params.py}.nnunet.teacher validation --summary {input.summary:q}"
        " --dataset-json {input.dataset:q} --label-map {params.labels:q}"
        " --fold {params.fold} --output {output:q} > {log:q} 2>&1"


# Test-set predictions of the teacher (ablation table): one job per shard, the model loaded once per shard.
# Shards are fixed when the workflow is parsed, so each is a rule of its own.
for teacher_shard, teacher_shard_cases in test_shards(shard_size_of("teacher")).items():

    rule:
        name:
            f"teacher_predict_{teacher_shard}"
        input:
            model=TEACHER_CHECKPOINT,
            images=[TEST[case]["image"] for case in teacher_shard_cases],
        output:
            predictions=[
                os.path.join(prediction_dir("teacher"), f"{case}.nii.gz")
                for case in teacher_shard_cases
            ],
            efficiency=os.path.join(
                prediction_dir("teacher"), "efficiency", f"{teacher_shard}.tsv"
            ),
        log:
            log_path("teacher_predict", teacher_shard),
        benchmark:
            bench_path("teacher_predict", teacher_shard)
        conda:
            "../envs/nnunet.yaml"
        threads: config["pseudo"]["threads"]
        resources:
            mem_mb=config["pseudo"]["mem_mb"],
            runtime=config["pseudo"]["runtime"],
            gpu=int(config["device"] == "cuda"),
        params:
            py=PY,
            model=lambda wildcards, input: os.path.dirname(os.path.dirname(input.model)),
            fold=TEACHER["fold"],
            tta="--tta" if config["pseudo"]["tta"] else "--no-tta",
            tta_batch=config["pseudo"]["tta_batch"],
            device=config["device"],
            cases=" ".join(teacher_shard_cases),
            labels=json.dumps(config["labels"]),
            postprocess=json.dumps(config["postprocess"]),
            interval=config["eval"]["gpu_sample_interval_s"],
        shell:
            "{params.py}.nnunet.predict --models {params.model:q} --fold {params.fold}"
            " {params.tta} --tta-batch {params.tta_batch} --device {params.device} --threads {threads}"
            " --cases {params.cases} --images {input.images:q} --outputs {output.predictions:q}"
            " --efficiency {output.efficiency:q} --labels {params.labels:q}"
            " --postprocess {params.postprocess:q} --interval {params.interval} > {log:q} 2>&1"


TARGETS["teacher"] = (
    [TEACHER_CHECKPOINT, res("teacher", "validation.tsv")]
    + prediction_files("teacher")
    + efficiency_tables("teacher")
)
