# Rules of the student stage: the coarse-to-fine student (workflow_scripts/c2f/), trained on the merged labels
# (two_stage) or on the raw weak labels (baseline, the paper's ablation), and its test-set predictions.
# Only experiments whose model is c2f are handled here; the nnU-Net student option lives in its own rule file.

import json

import pandas as pd

from workflow_scripts.labels.merge import ignore_label

# experiment -> label source ("merged" / "raw") of every c2f experiment
C2F_LABELS = {
    name: experiment["labels"]
    for name, experiment in config["student"]["experiments"].items()
    if experiment.get("model", "c2f") == "c2f"
}
C2F_EXPERIMENTS = list(C2F_LABELS)
# restricts the student rules' {experiment} wildcard so they never compete with the nnU-Net student's rules
C2F_PATTERN = "|".join(C2F_EXPERIMENTS) or "(?!)"


rule student_manifest:
    input:
        images=lambda wildcards: [
            TRAIN[case]["image"] for case in cases_by_category("strong", "weak")
        ],
        labels=lambda wildcards: [
            training_label(case, C2F_LABELS[wildcards.experiment])
            for case in cases_by_category("strong", "weak")
        ],
    output:
        res("student", "{experiment}", "train_cases.tsv"),
    log:
        log_path("student_manifest", "{experiment}"),
    benchmark:
        bench_path("student_manifest", "{experiment}")
    wildcard_constraints:
        experiment=C2F_PATTERN,
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    run:
        # written here, not by a job script: thousands of paths would exceed the shell's argument limit
        pd.DataFrame(
            {
                "case": cases_by_category("strong", "weak"),
                "image": input.images,
                "label": input.labels,
            }
        ).to_csv(output[0], sep="\t", index=False)


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
    conda:
        "../envs/student.yaml"
    threads: config["student"]["threads"]
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
        "{params.py}.c2f.train --manifest {input.manifest:q} --c2f {params.c2f:q}"
        " --label-ids {params.label_ids} --ignore-label {params.ignore}"
        " --work-dir {params.work_dir:q} --model {output.model:q} --log {output.log:q}"
        " --device {params.device} --threads {threads} > {log:q} 2>&1"


# One prediction job per shard of test cases: the model is loaded once per shard, and every case still gets its
# own output file. Shards are fixed when the workflow is parsed, so each is a rule of its own.
for student_shard, student_shard_cases in test_shards(
    config["student"]["shard_size"]
).items():

    rule:
        name:
            f"student_predict_{student_shard}"
        input:
            model=res("student", "{experiment}", "model", "model_final.pt"),
            images=[TEST[case]["image"] for case in student_shard_cases],
        output:
            predictions=[
                res("student", "{experiment}", "pred", f"{case}.nii.gz")
                for case in student_shard_cases
            ],
            efficiency=res(
                "student", "{experiment}", "pred", "efficiency", f"{student_shard}.tsv"
            ),
        log:
            log_path("student_predict", f"{{experiment}}_{student_shard}"),
        benchmark:
            bench_path("student_predict", f"{{experiment}}_{student_shard}")
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
            cases=" ".join(student_shard_cases),
            labels=json.dumps(config["labels"]),
            postprocess=json.dumps(config["postprocess"]),
            margin_mm=config["student"]["c2f"]["margin_mm"],
            amp=config["student"]["c2f"]["amp"],
            interval=config["eval"]["gpu_sample_interval_s"],
            device=config["device"],
        shell:
            "{params.py}.c2f.predict --model {input.model:q} --cases {params.cases}"
            " --images {input.images:q} --outputs {output.predictions:q}"
            " --efficiency {output.efficiency:q} --labels {params.labels:q}"
            " --postprocess {params.postprocess:q} --margin-mm {params.margin_mm}"
            " --device {params.device} --amp {params.amp} --threads {threads}"
            " --interval {params.interval} > {log:q} 2>&1"


TARGETS["student"] = [
    res("student", experiment, "model", "model_final.pt")
    for experiment in C2F_EXPERIMENTS
] + [path for experiment in C2F_EXPERIMENTS for path in prediction_files(experiment)]
