# Rules of the report stage: the evaluation figures (workflow_scripts/evaluation/figures.py), registered with report() so that
# `snakemake --report results/report.zip` collects them with the label-statistics figures and the tables.
# EVAL_EXPERIMENTS and SCORED_TEST_CASES (the test cases with a label) come from common.smk.

OVERLAY_EXPERIMENTS = config["eval"]["overlay_experiments"]


rule figure_dsc_boxplots:
    input:
        [res("eval", experiment, "metrics.tsv") for experiment in EVAL_EXPERIMENTS],
    output:
        report(
            res("report", "dsc_boxplots.png"),
            category="Evaluation",
            caption="../report/dsc_boxplots.rst",
            labels={"experiment": "all", "figure": "DSC per class"},
        ),
    log:
        log_path("figure_dsc_boxplots"),
    benchmark:
        bench_path("figure_dsc_boxplots")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        dpi=config["eval"]["figure_dpi"],
        experiments=" ".join(EVAL_EXPERIMENTS),
        label_map=LABEL_MAP,
    shell:
        "{params.py}.evaluation.figures --dpi {params.dpi} boxplots --experiments {params.experiments} --metrics {input:q}"
        " --label-map {params.label_map:q} --output {output:q} > {log:q} 2>&1"


rule figure_efficiency:
    input:
        [res("eval", experiment, "efficiency.tsv") for experiment in EVAL_EXPERIMENTS],
    output:
        report(
            res("report", "efficiency.png"),
            category="Efficiency",
            caption="../report/efficiency.rst",
            labels={"experiment": "all", "figure": "time and memory vs image size"},
        ),
    log:
        log_path("figure_efficiency"),
    benchmark:
        bench_path("figure_efficiency")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        dpi=config["eval"]["figure_dpi"],
        experiments=" ".join(EVAL_EXPERIMENTS),
    shell:
        "{params.py}.evaluation.figures --dpi {params.dpi} efficiency --experiments {params.experiments} --tables {input:q}"
        " --output {output:q} > {log:q} 2>&1"


rule figure_qualitative:
    input:
        rank=res("eval", config["eval"]["rank_experiment"], "metrics.tsv"),
        images=[TEST[case]["image"] for case in SCORED_TEST_CASES],
        gt=scored_test_labels,
        pred=[
            path
            for experiment in OVERLAY_EXPERIMENTS
            for path in prediction_files(experiment, SCORED_TEST_CASES)
        ],
    output:
        report(
            res("report", "qualitative.png"),
            category="Evaluation",
            caption="../report/qualitative.rst",
            labels={"experiment": "all", "figure": "best and worst case"},
        ),
    log:
        log_path("figure_qualitative"),
    benchmark:
        bench_path("figure_qualitative")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        dpi=config["eval"]["figure_dpi"],
        cases=" ".join(SCORED_TEST_CASES),
        label_map=LABEL_MAP,
        experiments=" ".join(OVERLAY_EXPERIMENTS),
        pred_dirs=[prediction_dir(e) for e in OVERLAY_EXPERIMENTS],
        window=" ".join(str(v) for v in config["eval"]["display_window"]),
    shell:
        "{params.py}.evaluation.figures --dpi {params.dpi} qualitative --rank-metrics {input.rank:q} --label-map {params.label_map:q}"
        " --cases {params.cases} --images {input.images:q} --gt {input.gt:q}"
        " --experiments {params.experiments} --pred-dirs {params.pred_dirs:q}"
        " --window {params.window} --output {output:q} > {log:q} 2>&1"


TARGETS["report"] = [
    res("report", name)
    for name in (
        ("dsc_boxplots.png", "efficiency.png", "qualitative.png")
        if SCORED_TEST_CASES
        else ("efficiency.png",)
    )
]
