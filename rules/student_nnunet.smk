# Rules of the nnU-Net student option (student.experiments[*].model: nnunet; workflow_scripts/nnunet/student.py):
# nnU-Net v2 trained on the merged or raw labels, one model per student.nnunet.batch_sizes entry, and the test-set
# predictions (no TTA, argmax on the logits, torch resampling; two or more models are a softmax ensemble).
# Each experiment has its own nnU-Net tree results/student/<experiment>/nnunet/{raw,preprocessed,results} and its
# own dataset id (student.nnunet.dataset_id + its position among the nnU-Net experiments), named by the {dataset}
# wildcard, which is constrained to exactly those names.

from workflow_scripts.nnunet.student import (
    experiment_dataset_ids,
    student_dataset_name,
    student_model_folder,
    uses_ignore_label,
)
from workflow_scripts.nnunet.training import (
    custom_plans_identifier,
    fold_name,
    plans_arguments,
)

NNUNET_STUDENT = config["student"]["nnunet"]
NNUNET_PLANS = custom_plans_identifier(NNUNET_STUDENT["planner"])
NNUNET_IDS = experiment_dataset_ids(
    config["student"]["experiments"], NNUNET_STUDENT["dataset_id"]
)
# experiment -> its nnU-Net dataset folder name, e.g. Dataset902_nnunet_b8
NNUNET_DATASETS = {
    experiment: student_dataset_name(dataset_id, experiment)
    for experiment, dataset_id in NNUNET_IDS.items()
}
NNUNET_EXPERIMENT_PATTERN = "|".join(NNUNET_DATASETS) or "(?!)"
NNUNET_DATASET_PATTERN = "|".join(NNUNET_DATASETS.values()) or "(?!)"
# nnU-Net's own model folder naming (the teacher's), with the wildcards in place of the values
NNUNET_CHECKPOINT = os.path.join(
    student_model_folder(
        res("student", "{experiment}", "nnunet"),
        "{dataset}",
        NNUNET_STUDENT["planner"],
        NNUNET_STUDENT["configuration"],
        "{batch}",
    ),
    fold_name(NNUNET_STUDENT["fold"]),
    "checkpoint_final.pth",
)


rule student_nnunet_manifest:
    input:
        images=student_training_images,
        labels=student_training_labels,
    output:
        res("student", "{experiment}", "nnunet", "train_cases.tsv"),
    log:
        log_path("student_nnunet_manifest", "{experiment}"),
    benchmark:
        bench_path("student_nnunet_manifest", "{experiment}")
    wildcard_constraints:
        experiment=NNUNET_EXPERIMENT_PATTERN,
    threads: 1
    resources:
        mem_mb=config["student"]["predict_mem_mb"],
        runtime=config["student"]["predict_runtime"],
    run:
        # a table, not a command line: thousands of paths would exceed the shell's argument limit
        write_student_manifest(
            wildcards.experiment, output[0], input.images, input.labels
        )


rule student_nnunet_dataset:
    input:
        res("student", "{experiment}", "nnunet", "train_cases.tsv"),
    output:
        res("student", "{experiment}", "nnunet", "raw", "{dataset}", "dataset.json"),
    log:
        log_path("student_nnunet_dataset", "{experiment}_{dataset}"),
    benchmark:
        bench_path("student_nnunet_dataset", "{experiment}_{dataset}")
    wildcard_constraints:
        experiment=NNUNET_EXPERIMENT_PATTERN,
        dataset=NNUNET_DATASET_PATTERN,
    conda:
        "../envs/nnunet.yaml"
    threads: 1
    resources:
        # one label in memory at a time, like a prediction job
        mem_mb=config["student"]["predict_mem_mb"],
        runtime=config["student"]["runtime"],
    params:
        py=PY,
        label_map=LABEL_MAP,
        ignore=lambda wildcards: (
            "--ignore"
            if uses_ignore_label(
                student_label_source(wildcards.experiment),
                student_low_confidence_as(wildcards.experiment),
            )
            else ""
        ),
        out=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "{params.py}.nnunet.student dataset --manifest {input:q} --label-map {params.label_map:q}"
        " {params.ignore} --output {params.out:q} > {log:q} 2>&1"


rule student_nnunet_plan:
    input:
        res("student", "{experiment}", "nnunet", "raw", "{dataset}", "dataset.json"),
    output:
        res(
            "student",
            "{experiment}",
            "nnunet",
            "preprocessed",
            "{dataset}",
            f"{NNUNET_PLANS}.json",
        ),
    log:
        log_path("student_nnunet_plan", "{experiment}_{dataset}"),
    benchmark:
        bench_path("student_nnunet_plan", "{experiment}_{dataset}")
    wildcard_constraints:
        experiment=NNUNET_EXPERIMENT_PATTERN,
        dataset=NNUNET_DATASET_PATTERN,
    conda:
        "../envs/nnunet.yaml"
    threads: config["student"]["threads"]
    resources:
        mem_mb=config["student"]["mem_mb"],
        runtime=config["student"]["runtime"],
    params:
        py=PY,
        root=lambda wildcards: res("student", wildcards.experiment, "nnunet"),
        dataset_id=lambda wildcards: NNUNET_IDS[wildcards.experiment],
        planner=NNUNET_STUDENT["planner"],
        configuration=NNUNET_STUDENT["configuration"],
        batch_sizes=" ".join(str(b) for b in NNUNET_STUDENT["batch_sizes"]),
        plans=shlex.join(plans_arguments(NNUNET_STUDENT)),
    shell:
        "{params.py}.nnunet.student plan --root {params.root:q} --dataset-id {params.dataset_id}"
        " --planner {params.planner} --configuration {params.configuration} --threads {threads}"
        " --batch-sizes {params.batch_sizes} {params.plans}"
        " --output {output:q} > {log:q} 2>&1"


rule student_nnunet_train:
    input:
        res(
            "student",
            "{experiment}",
            "nnunet",
            "preprocessed",
            "{dataset}",
            f"{NNUNET_PLANS}.json",
        ),
    output:
        # checkpoint_latest.pth next to it is left undeclared, so a killed job resumes from it
        NNUNET_CHECKPOINT,
    log:
        log_path("student_nnunet_train", "{experiment}_{dataset}_b{batch}"),
    benchmark:
        bench_path("student_nnunet_train", "{experiment}_{dataset}_b{batch}")
    wildcard_constraints:
        experiment=NNUNET_EXPERIMENT_PATTERN,
        dataset=NNUNET_DATASET_PATTERN,
        batch="[0-9]+",
    conda:
        "../envs/nnunet.yaml"
    threads: student_train_threads
    resources:
        mem_mb=config["student"]["mem_mb"],
        runtime=runtime_by_attempt(config["student"]["runtime"]),
        gpu=int(config["device"] == "cuda"),
    params:
        py=PY,
        root=lambda wildcards: res("student", wildcards.experiment, "nnunet"),
        dataset_id=lambda wildcards: NNUNET_IDS[wildcards.experiment],
        planner=NNUNET_STUDENT["planner"],
        configuration=NNUNET_STUDENT["configuration"],
        fold=NNUNET_STUDENT["fold"],
        device=config["device"],
    shell:
        "{params.py}.nnunet.student train --root {params.root:q} --dataset-id {params.dataset_id}"
        " --planner {params.planner} --configuration {params.configuration} --batch-size {wildcards.batch}"
        " --fold {params.fold} --device {params.device} --threads {threads}"
        " --expect {output:q} > {log:q} 2>&1"


# One prediction job per shard of test cases, as for the c2f student (prediction_shards in common.smk).
# workflow_scripts.nnunet.predict averages the softmax of the models (one per batch size), without mirroring TTA.
for nnunet_shard in prediction_shards(
    "student_nnunet_predict",
    res("student", "{experiment}", "pred"),
    config["student"]["shard_size"],
    "{experiment}_",
):

    rule:
        name:
            nnunet_shard.name
        input:
            checkpoints=lambda wildcards: expand(
                NNUNET_CHECKPOINT,
                experiment=wildcards.experiment,
                dataset=NNUNET_DATASETS[wildcards.experiment],
                batch=NNUNET_STUDENT["batch_sizes"],
            ),
            images=nnunet_shard.images,
        output:
            predictions=nnunet_shard.predictions,
            efficiency=nnunet_shard.efficiency,
        log:
            nnunet_shard.log,
        benchmark:
            nnunet_shard.benchmark
        wildcard_constraints:
            experiment=NNUNET_EXPERIMENT_PATTERN,
        conda:
            "../envs/nnunet.yaml"
        threads: config["student"]["threads"]
        resources:
            mem_mb=config["student"]["predict_mem_mb"],
            runtime=config["student"]["predict_runtime"],
            gpu=int(config["device"] == "cuda"),
        params:
            py=PY,
            models=lambda wildcards, input: [
                os.path.dirname(os.path.dirname(c)) for c in input.checkpoints
            ],
            fold=NNUNET_STUDENT["fold"],
            cases=nnunet_shard.cases,
            label_map=LABEL_MAP,
            postprocess=POSTPROCESS,
            interval=config["eval"]["gpu_sample_interval_s"],
            device=config["device"],
        shell:
            "{params.py}.nnunet.predict --models {params.models:q} --fold {params.fold} --no-tta"
            " --cases {params.cases} --images {input.images:q} --outputs {output.predictions:q}"
            " --efficiency {output.efficiency:q} --label-map {params.label_map:q}"
            " --postprocess {params.postprocess:q} --device {params.device} --threads {threads}"
            " --interval {params.interval} > {log:q} 2>&1"


TARGETS["student_nnunet"] = [
    path
    for experiment in NNUNET_DATASETS
    for path in expand(
        NNUNET_CHECKPOINT,
        experiment=experiment,
        dataset=NNUNET_DATASETS[experiment],
        batch=NNUNET_STUDENT["batch_sizes"],
    )
    + prediction_files(experiment)
    + efficiency_tables(experiment)
]
