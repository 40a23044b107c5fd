# Rules that show whether and how well the models learned (workflow_scripts/evaluation/: learning_curves.py,
# c2f_stages.py, label_quality.py): learning curves of the teacher and the c2f students, the c2f student's two
# stages measured apart on the test set, and, where the complete truth of the training cases is known (the demo,
# data.truth), the pseudo-labels and merged labels scored against it.

import shlex

# The commands scoring pseudo-labels and merged labels against the truth, of round 1 and of later rounds.
LABEL_QUALITY_PSEUDO_COMMAND = (
    "{params.py}.evaluation.label_quality --cases {params.cases} --truth {input.truth:q}"
    " --labels {input.labels:q} --classes {params.classes} --label-map {params.label_map:q}"
    " --output {output:q} > {log:q} 2>&1"
)
LABEL_QUALITY_MERGED_COMMAND = (
    "{params.py}.evaluation.label_quality --cases {params.cases} --truth {input.truth:q}"
    " --labels {input.labels:q} --split {input.split:q} --label-map {params.label_map:q}"
    " --output {output:q} > {log:q} 2>&1"
)


rule learning_curves:
    input:
        teacher=TEACHER_CHECKPOINT,
        students=[
            res("student", experiment, "model", "training_log.tsv")
            for experiment in C2F_EXPERIMENTS
        ],
    output:
        table=res("eval", "learning_curves.tsv"),
        figure=report(
            res("report", "learning_curves.png"),
            category="Learning",
            caption="../report/learning_curves.rst",
            labels={"figure": "learning curves"},
        ),
    log:
        log_path("learning_curves"),
    benchmark:
        bench_path("learning_curves")
    conda:
        "../envs/student.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        dpi=config["eval"]["figure_dpi"],
        classes=" ".join(str(c) for c in TEACHER["classes"]),
        students=lambda wildcards, input: " ".join(
            shlex.quote(f"{experiment}={path}")
            for experiment, path in zip(C2F_EXPERIMENTS, input.students)
        ),
        label_map=LABEL_MAP,
    shell:
        "{params.py}.evaluation.learning_curves --teacher {input.teacher:q}"
        " --teacher-classes {params.classes} --students {params.students}"
        " --label-map {params.label_map:q} --dpi {params.dpi}"
        " --output-table {output.table:q} --output-figure {output.figure:q} > {log:q} 2>&1"


rule c2f_stages:
    input:
        gt=scored_test_labels,
        pred=lambda wildcards: prediction_files(wildcards.experiment, SCORED_TEST_CASES),
        boxes=lambda wildcards: box_tables(wildcards.experiment),
    output:
        report(
            res("eval", "{experiment}", "c2f_stages.tsv"),
            category="Learning",
            subcategory="{experiment}",
            caption="../report/c2f_stages.rst",
            labels={"experiment": "{experiment}", "table": "coarse box and fine DSC"},
        ),
    log:
        log_path("c2f_stages", "{experiment}"),
    benchmark:
        bench_path("c2f_stages", "{experiment}")
    wildcard_constraints:
        experiment=C2F_PATTERN,
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        cases=" ".join(SCORED_TEST_CASES),
        label_map=LABEL_MAP,
    shell:
        "{params.py}.evaluation.c2f_stages --cases {params.cases} --gt {input.gt:q}"
        " --pred {input.pred:q} --boxes {input.boxes:q} --label-map {params.label_map:q}"
        " --output {output:q} > {log:q} 2>&1"


rule label_quality_pseudo:
    input:
        truth=lambda wildcards: [
            TRUTH[case] for case in with_truth(pseudo_labelled_cases())
        ],
        labels=lambda wildcards: [
            res("pseudo", f"{case}.nii.gz")
            for case in with_truth(pseudo_labelled_cases())
        ],
    output:
        report(
            res("eval", "labels", "pseudo.tsv"),
            category="Learning",
            caption="../report/label_quality.rst",
            labels={"table": "pseudo-labels vs truth"},
        ),
    log:
        log_path("label_quality_pseudo"),
    benchmark:
        bench_path("label_quality_pseudo")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        cases=lambda wildcards: " ".join(with_truth(pseudo_labelled_cases())),
        classes=" ".join(str(c) for c in TEACHER["classes"]),
        label_map=LABEL_MAP,
    shell:
        LABEL_QUALITY_PSEUDO_COMMAND


rule label_quality_merged:
    input:
        split=lambda wildcards: checkpoints.split.get().output.split,
        truth=lambda wildcards: [
            TRUTH[case] for case in with_truth(merged_label_cases())
        ],
        labels=lambda wildcards: [
            res("merged", f"{case}.nii.gz")
            for case in with_truth(merged_label_cases())
        ],
    output:
        report(
            res("eval", "labels", "merged.tsv"),
            category="Learning",
            caption="../report/label_quality.rst",
            labels={"table": "merged labels vs truth"},
        ),
    log:
        log_path("label_quality_merged"),
    benchmark:
        bench_path("label_quality_merged")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        cases=lambda wildcards: " ".join(with_truth(merged_label_cases())),
        label_map=LABEL_MAP,
    shell:
        LABEL_QUALITY_MERGED_COMMAND


# The same scores of a later round's pseudo-labels (the classes it may fill) and merged labels (README, "Rounds"):
# whether the round-k student labels the weak cases better than the teacher did.
rule round_label_quality_pseudo:
    input:
        truth=lambda wildcards: [
            TRUTH[case] for case in with_truth(pseudo_labelled_cases())
        ],
        labels=lambda wildcards: [
            res(f"round{wildcards.round}", "pseudo", f"{case}.nii.gz")
            for case in with_truth(pseudo_labelled_cases())
        ],
    output:
        report(
            res("round{round}", "eval", "labels", "pseudo.tsv"),
            category="Learning",
            caption="../report/label_quality.rst",
            labels={"table": "pseudo-labels vs truth (round {round})"},
        ),
    log:
        log_path("round_label_quality_pseudo", "round{round}"),
    benchmark:
        bench_path("round_label_quality_pseudo", "round{round}")
    wildcard_constraints:
        round=ROUND_PATTERN,
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        cases=lambda wildcards: " ".join(with_truth(pseudo_labelled_cases())),
        classes=" ".join(str(c) for c in ROUND_FILL_CLASSES),
        label_map=LABEL_MAP,
    shell:
        LABEL_QUALITY_PSEUDO_COMMAND


rule round_label_quality_merged:
    input:
        split=lambda wildcards: checkpoints.split.get().output.split,
        truth=lambda wildcards: [
            TRUTH[case] for case in with_truth(merged_label_cases())
        ],
        labels=lambda wildcards: [
            res(f"round{wildcards.round}", "merged", f"{case}.nii.gz")
            for case in with_truth(merged_label_cases())
        ],
    output:
        report(
            res("round{round}", "eval", "labels", "merged.tsv"),
            category="Learning",
            caption="../report/label_quality.rst",
            labels={"table": "merged labels vs truth (round {round})"},
        ),
    log:
        log_path("round_label_quality_merged", "round{round}"),
    benchmark:
        bench_path("round_label_quality_merged", "round{round}")
    wildcard_constraints:
        round=ROUND_PATTERN,
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        cases=lambda wildcards: " ".join(with_truth(merged_label_cases())),
        label_map=LABEL_MAP,
    shell:
        LABEL_QUALITY_MERGED_COMMAND


TARGETS["learning"] = (
    [res("eval", "learning_curves.tsv"), res("report", "learning_curves.png")]
    + [
        res("eval", experiment, "c2f_stages.tsv")
        for experiment in C2F_EXPERIMENTS
        if SCORED_TEST_CASES
    ]
    + (
        [res("eval", "labels", "pseudo.tsv"), res("eval", "labels", "merged.tsv")]
        if TRUTH
        else []
    )
    + [
        res(f"round{number}", "eval", "labels", name)
        for number in LATER_ROUNDS
        for name in ("pseudo.tsv", "merged.tsv")
        if TRUTH
    ]
)
