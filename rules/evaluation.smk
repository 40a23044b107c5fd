# Rules of the evaluation stage (workflow_scripts/evaluation/): FLARE DSC/NSD per experiment (evaluate.py), the
# per-experiment efficiency table (efficiency_report.py) and the ablation table (ablation.py). EVAL_EXPERIMENTS (the
# student experiments plus the teacher), TEST_CASES and the scored / unscored test cases (those with / without a
# label) are in common.smk: rules/report.smk and rules/learning.smk use them too.

from snakemake.logging import logger

EVAL_PATTERN = "|".join(EVAL_EXPERIMENTS)
# The commands of an experiment's scoring and of the ablation table, also of the later rounds' (rules/rounds.smk).
EVALUATE_COMMAND = (
    "{params.py}.evaluation.evaluate --cases {params.cases} --unscored {params.unscored}"
    " --gt {input.gt:q} --pred {input.pred:q}"
    " --label-map {params.label_map:q} --z-crop-classes {params.z_crop}"
    " --nsd-zero-below-dsc {params.nsd_zero_below_dsc} {params.tolerances} --jobs {threads}"
    " --metrics {output.metrics:q} --summary {output.summary:q} > {log:q} 2>&1"
)
EVALUATE_PARAMS = dict(
    py=PY,
    cases=" ".join(SCORED_TEST_CASES),
    unscored=" ".join(UNSCORED_TEST_CASES),
    label_map=LABEL_MAP,
    z_crop=(
        " ".join(str(c) for c in config["eval"]["tubular_classes"])
        if config["eval"]["tubular_z_crop"]
        else ""
    ),
    nsd_zero_below_dsc=config["eval"]["nsd_zero_below_dsc"],
    tolerances=GEOMETRY_TOLERANCE_ARGS,
)
ABLATION_COMMAND = (
    "{params.py}.evaluation.ablation --experiments {params.experiments} --summaries {input:q}"
    " --output {output:q} > {log:q} 2>&1"
)

for key in ("ablation", "overlay_experiments"):
    unknown = sorted(set(config["eval"][key]) - set(EVAL_EXPERIMENTS))
    if unknown:
        raise ValueError(
            f"config eval.{key} names {unknown}, which are not evaluated (eval.experiments + teacher)"
        )
if config["eval"]["rank_experiment"] not in EVAL_EXPERIMENTS:
    raise ValueError(
        f"config eval.rank_experiment {config['eval']['rank_experiment']!r} is not evaluated"
    )


rule evaluate_experiment:
    input:
        gt=scored_test_labels,
        pred=lambda wildcards: prediction_files(wildcards.experiment, SCORED_TEST_CASES),
    output:
        metrics=res("eval", "{experiment}", "metrics.tsv"),
        summary=report(
            res("eval", "{experiment}", "summary.tsv"),
            category="Evaluation",
            subcategory="{experiment}",
            caption="../report/summary.rst",
            labels={"experiment": "{experiment}", "table": "DSC / NSD summary"},
        ),
    log:
        log_path("evaluate_experiment", "{experiment}"),
    benchmark:
        bench_path("evaluate_experiment", "{experiment}")
    wildcard_constraints:
        experiment=EVAL_PATTERN,
    conda:
        "../envs/base.yaml"
    threads: config["eval"]["threads"]
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        **EVALUATE_PARAMS,
    shell:
        EVALUATE_COMMAND


rule efficiency_experiment:
    input:
        lambda wildcards: efficiency_tables(wildcards.experiment),
    output:
        report(
            res("eval", "{experiment}", "efficiency.tsv"),
            category="Efficiency",
            subcategory="{experiment}",
            caption="../report/efficiency_table.rst",
            labels={"experiment": "{experiment}", "table": "time and memory per case"},
        ),
    log:
        log_path("efficiency_experiment", "{experiment}"),
    benchmark:
        bench_path("efficiency_experiment", "{experiment}")
    wildcard_constraints:
        experiment=EVAL_PATTERN,
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        cases=" ".join(TEST_CASES),
    shell:
        "{params.py}.evaluation.efficiency_report --tables {input:q} --cases {params.cases}"
        " --output {output:q} > {log:q} 2>&1"


rule ablation:
    input:
        [
            res("eval", experiment, "summary.tsv")
            for experiment in config["eval"]["ablation"]
        ],
    output:
        report(
            res("eval", "ablation.tsv"),
            category="Evaluation",
            caption="../report/ablation.rst",
            labels={"experiment": "all", "table": "ablation (Table 4)"},
        ),
    log:
        log_path("ablation"),
    benchmark:
        bench_path("ablation")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        experiments=" ".join(config["eval"]["ablation"]),
    shell:
        ABLATION_COMMAND


# Without any test label nothing is scored: the default targets keep the predictions and their efficiency tables.
if not SCORED_TEST_CASES:
    logger.warning(
        f"No test image has a label in {DATA['test_labels']}: the test set is predicted, not scored"
        " (no eval/*/metrics.tsv, summary.tsv, ablation, DSC figures or c2f_stages tables)."
    )
TARGETS["eval"] = [
    res("eval", experiment, name)
    for experiment in EVAL_EXPERIMENTS
    for name in (
        ("metrics.tsv", "summary.tsv", "efficiency.tsv")
        if SCORED_TEST_CASES
        else ("efficiency.tsv",)
    )
] + ([res("eval", "ablation.tsv")] if SCORED_TEST_CASES else [])
