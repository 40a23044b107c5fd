# Rules of the student stage: the coarse-to-fine student (workflow_scripts/c2f/), trained on the merged labels
# (two_stage) or on the raw weak labels (baseline, the paper's ablation), with unlabeled: true also on the unlabeled
# cases' merged labels (the ignore label excluded from the loss), and its test-set predictions.
# Only experiments whose model is c2f are handled here; the nnU-Net student option lives in its own rule file.

import json

from workflow_scripts.io.label_map import ignore_label

# The commands of a c2f student's training and test-set prediction, also of the later rounds' (rules/rounds.smk).
STUDENT_TRAIN_COMMAND = (
    "{params.py}.c2f.train --manifest {input.manifest:q} --c2f {params.c2f:q}"
    " --label-ids {params.label_ids} --ignore-label {params.ignore}"
    " --work-dir {params.work_dir:q} --model {output.model:q} --log {output.log:q}"
    " --device {params.device} --threads {threads} > {log:q} 2>&1"
)
STUDENT_PREDICT_COMMAND = (
    "{params.py}.c2f.predict --model {input.model:q} --cases {params.cases}"
    " --images {input.images:q} --outputs {output.predictions:q}"
    " --efficiency {output.efficiency:q} --boxes {output.boxes:q} --label-map {params.label_map:q}"
    " --postprocess {params.postprocess:q} --margin-mm {params.margin_mm}"
    " --device {params.device} --amp {params.amp} --threads {threads}"
    " --interval {params.interval} > {log:q} 2>&1"
)


rule student_manifest:
    input:
        images=student_training_images,
        labels=student_training_labels,
    output:
        res("student", "{experiment}", "train_cases.tsv"),
    log:
        log_path("student_manifest", "{experiment}"),
    benchmark:
        bench_path("student_manifest", "{experiment}")
    wildcard_constraints:
        experiment=C2F_PATTERN,
    priority: TRAINING_PATH_PRIORITY
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    run:
        # a table, not a command line: thousands of paths would exceed the shell's argument limit
        write_student_manifest(
            wildcards.experiment, output[0], input.images, input.labels
        )


rule student_train:
    input:
        manifest=res("student", "{experiment}", "train_cases.tsv"),
    output:
        model=res("student", "{experiment}", "model", "model_final.pt"),
        log=res("student", "{experiment}", "model", "training_log.tsv"),
    log:
        log_path("student_train", "{experiment}"),
    benchmark:
        bench_path("student_train", "{experiment}")
    wildcard_constraints:
        experiment=C2F_PATTERN,
    priority: TRAINING_PATH_PRIORITY
    conda:
        "../envs/student.yaml"
    threads: student_train_threads
    resources:
        mem_mb=config["student"]["mem_mb"],
        runtime=runtime_by_attempt(config["student"]["runtime"]),
        gpu=int(config["device"] == "cuda"),
    params:
        py=PY,
        c2f=json.dumps(config["student"]["c2f"]),
        label_ids=" ".join(str(i) for i in LABELS),
        ignore=ignore_label(config["labels"]),
        work_dir=lambda wildcards: res("student", wildcards.experiment, "checkpoints"),
        device=config["device"],
    shell:
        STUDENT_TRAIN_COMMAND


# One prediction job per shard of test cases (prediction_shards in common.smk).
for student_shard in prediction_shards(
    "student_predict",
    res("student", "{experiment}", "pred"),
    config["student"]["shard_size"],
    "{experiment}_",
):

    rule:
        name:
            student_shard.name
        input:
            model=res("student", "{experiment}", "model", "model_final.pt"),
            images=student_shard.images,
        output:
            predictions=student_shard.predictions,
            efficiency=student_shard.efficiency,
            boxes=student_shard.boxes,
        log:
            student_shard.log,
        benchmark:
            student_shard.benchmark
        wildcard_constraints:
            experiment=C2F_PATTERN,
        conda:
            "../envs/student.yaml"
        threads: config["student"]["threads"]
        resources:
            mem_mb=config["student"]["predict_mem_mb"],
            runtime=config["student"]["predict_runtime"],
            gpu=int(config["device"] == "cuda"),
        params:
            py=PY,
            cases=student_shard.cases,
            label_map=LABEL_MAP,
            postprocess=POSTPROCESS,
            margin_mm=config["student"]["c2f"]["margin_mm"],
            amp=config["student"]["c2f"]["amp"],
            interval=config["eval"]["gpu_sample_interval_s"],
            device=config["device"],
        shell:
            STUDENT_PREDICT_COMMAND


# One self-contained file of a trained student (networks + inference settings + label map), for
# `python -m workflow_scripts.c2f.apply` outside the workflow; built on request only (not part of `rule all`).
rule student_export:
    input:
        res("student", "{experiment}", "model", "model_final.pt"),
    output:
        res("student", "{experiment}", "export", "{experiment}.pt"),
    log:
        log_path("student_export", "{experiment}"),
    benchmark:
        bench_path("student_export", "{experiment}")
    wildcard_constraints:
        experiment=C2F_PATTERN,
    conda:
        "../envs/student.yaml"
    threads: 1
    resources:
        mem_mb=config["student"]["predict_mem_mb"],
        runtime=config["student"]["predict_runtime"],
    params:
        py=PY,
        label_map=LABEL_MAP,
        postprocess=POSTPROCESS,
        margin_mm=config["student"]["c2f"]["margin_mm"],
        amp=config["student"]["c2f"]["amp"],
    shell:
        "{params.py}.c2f.export --model {input:q} --output {output:q} --experiment {wildcards.experiment}"
        " --margin-mm {params.margin_mm} --amp {params.amp} --label-map {params.label_map:q}"
        " --postprocess {params.postprocess:q} > {log:q} 2>&1"


TARGETS["student"] = [
    res("student", experiment, "model", "model_final.pt")
    for experiment in C2F_EXPERIMENTS
] + [path for experiment in C2F_EXPERIMENTS for path in prediction_files(experiment)]
