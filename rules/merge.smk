# Rules of the merge stage: supplement weak labels with the teacher's pseudo-labels (annotations never change),
# pass strong labels through, give unlabeled cases their filtered pseudo-label (when PSEUDO_UNLABELED), and summarise
# what was filled, per case and per student. merged_label_cases(), merged_label_files(), merge_setting() and
# training_label() live in common.smk because the student stages use them too.

from workflow_scripts.labels.merge import input_flags, rule_inputs

# The command of a case's merge, also of the later rounds' (rules/rounds.smk).
MERGE_CASE_COMMAND = (
    "{params.py}.labels.merge case --case {wildcards.case} {params.inputs}"
    " --label-map {params.label_map:q} --fill-classes {params.fill_classes}"
    " --min-confidence {params.min_confidence} --low-confidence-as {params.low_confidence_as}"
    " {params.tolerances} --output-label {output.label:q} --output-table {output.table:q} > {log:q} 2>&1"
)
MERGE_SUMMARY_COMMAND = (
    "{params.py}.labels.merge summary --split {input.split:q} --tables {input.tables:q}"
    " --output {output:q} > {log:q} 2>&1"
)


rule merge_case:
    input:
        unpack(
            lambda wildcards: rule_inputs(
                wildcards.case,
                cases_by_category("strong"),
                merged_label_cases(),
                TRAIN[wildcards.case]["label"],
                res("pseudo"),
            )
        ),
    output:
        label=res("merged", "{case}.nii.gz"),
        table=res("merged", "{case}.tsv"),
    log:
        log_path("merge_case", "{case}"),
    benchmark:
        bench_path("merge_case", "{case}")
    priority: TRAINING_PATH_PRIORITY
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["merge"]["mem_mb"],
        runtime=config["merge"]["runtime"],
    params:
        py=PY,
        inputs=lambda wildcards, input: input_flags(input.items()),
        label_map=LABEL_MAP,
        fill_classes=" ".join(str(c) for c in config["teacher"]["classes"]),
        # per case: unlabeled cases may have their own (merge.unlabeled_*); strong and weak cases' values are the
        # plain merge.* ones, so a change of the unlabeled settings re-merges the unlabeled cases only
        min_confidence=lambda wildcards: merge_setting(wildcards.case, "min_confidence"),
        low_confidence_as=lambda wildcards: merge_setting(
            wildcards.case, "low_confidence_as"
        ),
        tolerances=GEOMETRY_TOLERANCE_ARGS,
    shell:
        MERGE_CASE_COMMAND


rule merge_summary:
    input:
        split=lambda wildcards: checkpoints.split.get().output.split,
        tables=lambda wildcards: [
            res("merged", f"{case}.tsv") for case in merged_label_cases()
        ],
    output:
        res("merged", "summary.tsv"),
    log:
        log_path("merge_summary"),
    benchmark:
        bench_path("merge_summary")
    priority: TRAINING_PATH_PRIORITY
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["merge"]["mem_mb"],
        runtime=config["merge"]["runtime"],
    params:
        py=PY,
    shell:
        MERGE_SUMMARY_COMMAND


# How many merged cases of each category every student on merged labels trains on, and the pseudo voxels filled,
# left out and ignored in them (workflow_scripts.labels.merge.student_table).
rule merge_students:
    input:
        res("merged", "summary.tsv"),
    output:
        res("merged", "students.tsv"),
    log:
        log_path("merge_students"),
    benchmark:
        bench_path("merge_students")
    priority: TRAINING_PATH_PRIORITY
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["merge"]["mem_mb"],
        runtime=config["merge"]["runtime"],
    params:
        py=PY,
        categories=json.dumps(
            {
                name: list(categories)
                for name, categories in TRAINING_CATEGORIES.items()
                if student_label_source(name) == "merged"
            }
        ),
    shell:
        "{params.py}.labels.merge students --summary {input:q} --categories {params.categories:q}"
        " --output {output:q} > {log:q} 2>&1"


TARGETS["merge"] = [res("merged", "summary.tsv"), res("merged", "students.tsv")]
