# Rules of the merge stage: supplement weak labels with the teacher's pseudo-labels (annotations never change),
# pass strong labels through, and summarise what was filled.

import json
import shlex


def merged_categories():
    """Split categories that get a merged label; unlabeled cases only when they also get pseudo-labels."""
    if config["pseudo"]["include_unlabeled"]:
        return ("strong", "weak", "unlabeled")
    return ("strong", "weak")


def merged_cases():
    return cases_by_category(*merged_categories())


def merged_label_files(wildcards=None):
    """Input function: the merged label of every case that has one (strong, weak and, if enabled, unlabeled)."""
    return [res("merged", f"{case}.nii.gz") for case in merged_cases()]


def training_label(case, source):
    """The label a student trains on: the merged label, or the raw weak label as annotated (source "raw")."""
    if source == "merged":
        return res("merged", f"{case}.nii.gz")
    if source == "raw":
        if TRAIN[case]["label"] is None:
            raise ValueError(f"case {case!r} is unlabeled: it has no raw label")
        return TRAIN[case]["label"]
    raise ValueError(f"label source must be 'merged' or 'raw', got {source!r}")


def merge_case_inputs(wildcards):
    """The raw label (absent for an unlabeled case) and, except for a strong case, the pseudo-label + confidence."""
    case = wildcards.case
    if case in cases_by_category("strong"):
        return {"weak": TRAIN[case]["label"]}
    if case not in merged_cases():
        raise ValueError(
            f"case {case!r} gets no merged label (unlabeled, and pseudo.include_unlabeled is false)"
        )
    inputs = {
        "pseudo": res("pseudo", f"{case}.nii.gz"),
        "confidence": res("pseudo", f"{case}_confidence.nii.gz"),
    }
    if TRAIN[case]["label"] is not None:
        inputs["weak"] = TRAIN[case]["label"]
    return inputs


def merge_case_arguments(wildcards, input):
    """Command-line flags for whichever inputs this case has."""
    return " ".join(f"--{name} {shlex.quote(path)}" for name, path in input.items())


rule merge_case:
    input:
        unpack(merge_case_inputs),
    output:
        label=res("merged", "{case}.nii.gz"),
        table=res("merged", "{case}.tsv"),
    log:
        log_path("merge_case", "{case}"),
    benchmark:
        bench_path("merge_case", "{case}")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["merge"]["mem_mb"],
        runtime=config["merge"]["runtime"],
    params:
        inputs=merge_case_arguments,
        labels=json.dumps(config["labels"]),
        fill_classes=" ".join(str(c) for c in config["teacher"]["classes"]),
        min_confidence=config["merge"]["min_confidence"],
        low_confidence_as=config["merge"]["low_confidence_as"],
        tolerances=(
            f"--spacing-tolerance {config['qc']['spacing_tolerance']}"
            f" --origin-tolerance-mm {config['qc']['origin_tolerance_mm']}"
            f" --direction-tolerance {config['qc']['direction_tolerance']}"
        ),
    shell:
        "{PY}.merge case --case {wildcards.case} {params.inputs}"
        " --labels {params.labels:q} --fill-classes {params.fill_classes}"
        " --min-confidence {params.min_confidence} --low-confidence-as {params.low_confidence_as}"
        " {params.tolerances} --out-label {output.label:q} --out-table {output.table:q} > {log:q} 2>&1"


rule merge_summary:
    input:
        split=lambda wildcards: checkpoints.split.get().output.split,
        tables=lambda wildcards: [
            res("merged", f"{case}.tsv") for case in merged_cases()
        ],
    output:
        res("merged", "summary.tsv"),
    log:
        log_path("merge_summary"),
    benchmark:
        bench_path("merge_summary")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["merge"]["mem_mb"],
        runtime=config["merge"]["runtime"],
    shell:
        "{PY}.merge summary --split {input.split:q} --tables {input.tables:q}"
        " --output {output:q} > {log:q} 2>&1"


TARGETS["merge"] = [res("merged", "summary.tsv")]
