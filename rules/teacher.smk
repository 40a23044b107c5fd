# Rules of the teacher stage: nnU-Net v2 trained on the strong cases (workflow_scripts/nnunet/teacher.py, training.py).
# nnU-Net's folders live under results/teacher/nnunet/{raw,preprocessed,results}; its environment variables are
# set inside each job (workflow_scripts/nnunet/ext.configure_environment), never globally. Training declares only
# checkpoint_final.pth and the validation summary: checkpoint_latest.pth next to them is left undeclared, so
# Snakemake keeps it when a job is killed and the rerun continues from it. The model's paths (TEACHER_*) are in
# common.smk: rules/pseudo.smk predicts with it too.

from workflow_scripts.nnunet.training import (
    PLANS_IDENTIFIERS,
    custom_plans_identifier,
    plans_arguments,
)

TEACHER_PREPROCESSED = os.path.join(TEACHER_ROOT, "preprocessed", TEACHER_DATASET)
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
    priority: TEACHER_PATH_PRIORITY
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
        label_map=LABEL_MAP,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "{params.py}.nnunet.dataset --cases {params.cases} --images {input.images:q}"
        " --labels {input.labels:q} --classes {params.classes} --label-map {params.label_map:q}"
        " --output {params.out:q} > {log:q} 2>&1"


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
    priority: TEACHER_PATH_PRIORITY
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
    priority: TEACHER_PATH_PRIORITY
    conda:
        "../envs/nnunet.yaml"
    threads: 1
    resources:
        mem_mb=config["pseudo"]["mem_mb"],
        runtime=TEACHER["runtime"],
    params:
        py=PY,
        args=TEACHER_ARGS,
        plans=shlex.join(plans_arguments(TEACHER))
        + (
            f" --batch-size {TEACHER['batch_size']}"
            if TEACHER["batch_size"] is not None
            else ""
        ),
    shell:
        "{params.py}.nnunet.teacher configure {params.args} --base-plans {input:q}"
        " {params.plans} --output {output:q} > {log:q} 2>&1"


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
    priority: TEACHER_PATH_PRIORITY
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
        label_map=LABEL_MAP,
        fold=TEACHER["fold"],
    shell:
        "{params.py}.nnunet.teacher validation --summary {input.summary:q}"
        " --dataset-json {input.dataset:q} --label-map {params.label_map:q}"
        " --fold {params.fold} --output {output:q} > {log:q} 2>&1"


# Test-set predictions of the teacher (ablation table): one job per shard (prediction_shards in common.smk).
for teacher_shard in prediction_shards(
    "teacher_predict", prediction_dir("teacher"), shard_size_of("teacher")
):

    rule:
        name:
            teacher_shard.name
        input:
            model=TEACHER_CHECKPOINT,
            images=teacher_shard.images,
        output:
            predictions=teacher_shard.predictions,
            efficiency=teacher_shard.efficiency,
        log:
            teacher_shard.log,
        benchmark:
            teacher_shard.benchmark
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
            cases=teacher_shard.cases,
            label_map=LABEL_MAP,
            postprocess=POSTPROCESS,
            interval=config["eval"]["gpu_sample_interval_s"],
        shell:
            "{params.py}.nnunet.predict --models {params.model:q} --fold {params.fold}"
            " {params.tta} --tta-batch {params.tta_batch} --device {params.device} --threads {threads}"
            " --cases {params.cases} --images {input.images:q} --outputs {output.predictions:q}"
            " --efficiency {output.efficiency:q} --label-map {params.label_map:q}"
            " --postprocess {params.postprocess:q} --interval {params.interval} > {log:q} 2>&1"


TARGETS["teacher"] = (
    [TEACHER_CHECKPOINT, res("teacher", "validation.tsv")]
    + prediction_files("teacher")
    + efficiency_tables("teacher")
)
