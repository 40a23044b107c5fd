# Rules of later rounds (config section `rounds`, README "Rounds"; workflow_scripts/ingest/rounds.py). Round 1 is
# the paper and keeps its paths (pseudo/, merged/, student/, eval/); round k >= 2 writes results/round<k>/: the
# pseudo-labeller (rounds.pseudo_labeller, a c2f student on merged labels) of round k - 1 pseudo-labels the same
# cases as the teacher did (pseudo_shards in common.smk) with confidence maps, the merge rule of round 1 merges them
# (rounds.fill_classes: which classes may fill), the c2f students on merged labels train again (student.c2f with
# rounds.c2f's overrides) and are scored. eval/rounds.tsv puts every round's students next to the baseline and the
# teacher. With rounds.count 1 (the default) no path of these rules is asked for: the plan is the paper's. The
# rounds' settings and paths (ROUNDS, ROUND_*, round_res, round_model) are in common.smk.

from workflow_scripts.ingest.rounds import side_by_side


rule round_pseudo_shard:
    input:
        model=lambda wildcards: round_model(
            int(wildcards.round) - 1, ROUNDS["pseudo_labeller"]
        ),
        images=lambda wildcards: [
            TRAIN[case]["image"] for case in pseudo_shards()[wildcards.shard]
        ],
    output:
        directory(res("round{round}", "pseudo", "shards", "{shard}")),
    log:
        log_path("round_pseudo_shard", "round{round}_{shard}"),
    benchmark:
        bench_path("round_pseudo_shard", "round{round}_{shard}")
    wildcard_constraints:
        round=ROUND_PATTERN,
        shard=CASE_ID,
    conda:
        "../envs/student.yaml"
    threads: config["student"]["threads"]
    resources:
        mem_mb=config["student"]["predict_mem_mb"],
        runtime=config["student"]["predict_runtime"],
        gpu=int(config["device"] == "cuda"),
    params:
        py=PY,
        cases=lambda wildcards: " ".join(pseudo_shards()[wildcards.shard]),
        outputs=lambda wildcards, output: [
            case_files(output[0], case)[0] for case in pseudo_shards()[wildcards.shard]
        ],
        confidences=lambda wildcards, output: [
            case_files(output[0], case)[1] for case in pseudo_shards()[wildcards.shard]
        ],
        efficiency=lambda wildcards, output: os.path.join(output[0], "efficiency.tsv"),
        label_map=LABEL_MAP,
        postprocess=POSTPROCESS,
        # the pseudo-labeller is round k - 1's model: applied with that round's settings
        margin_mm=lambda wildcards: round_c2f_setting(
            int(wildcards.round) - 1, "margin_mm"
        ),
        amp=lambda wildcards: round_c2f_setting(int(wildcards.round) - 1, "amp"),
        interval=config["eval"]["gpu_sample_interval_s"],
        device=config["device"],
    shell:
        "{params.py}.c2f.predict --model {input.model:q} --cases {params.cases}"
        " --images {input.images:q} --outputs {params.outputs:q} --confidences {params.confidences:q}"
        " --efficiency {params.efficiency:q} --label-map {params.label_map:q}"
        " --postprocess {params.postprocess:q} --margin-mm {params.margin_mm}"
        " --device {params.device} --amp {params.amp} --threads {threads}"
        " --interval {params.interval} > {log:q} 2>&1"


localrules:
    round_pseudo_case,


rule round_pseudo_case:
    input:
        lambda wildcards: res(
            f"round{wildcards.round}",
            "pseudo",
            "shards",
            shard_of(wildcards.case, pseudo_shards()),
        ),
    output:
        label=res("round{round}", "pseudo", "{case}.nii.gz"),
        confidence=res("round{round}", "pseudo", "{case}_confidence.nii.gz"),
    log:
        log_path("round_pseudo_case", "round{round}_{case}"),
    benchmark:
        bench_path("round_pseudo_case", "round{round}_{case}")
    wildcard_constraints:
        round=ROUND_PATTERN,
        case=f"{CASE_ID}(?<!_confidence)",
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=100,
        runtime=1,
    params:
        label=lambda wildcards, input: case_files(input[0], wildcards.case)[0],
        confidence=lambda wildcards, input: case_files(input[0], wildcards.case)[1],
    shell:
        "(ln -f {params.label:q} {output.label:q}"
        " && ln -f {params.confidence:q} {output.confidence:q}) > {log:q} 2>&1"


rule round_merge_case:
    input:
        unpack(
            lambda wildcards: rule_inputs(
                wildcards.case,
                cases_by_category("strong"),
                merged_label_cases(),
                TRAIN[wildcards.case]["label"],
                res(f"round{wildcards.round}", "pseudo"),
            )
        ),
    output:
        label=res("round{round}", "merged", "{case}.nii.gz"),
        table=res("round{round}", "merged", "{case}.tsv"),
    log:
        log_path("round_merge_case", "round{round}_{case}"),
    benchmark:
        bench_path("round_merge_case", "round{round}_{case}")
    wildcard_constraints:
        round=ROUND_PATTERN,
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["merge"]["mem_mb"],
        runtime=config["merge"]["runtime"],
    params:
        py=PY,
        # the pseudo-labeller is a student: its pseudo-labels hold every class, those outside fill_classes are dropped
        inputs=lambda wildcards, input: input_flags(input.items())
        + " --pseudo-classes "
        + " ".join(str(c) for c in LABELS),
        label_map=LABEL_MAP,
        fill_classes=" ".join(str(c) for c in ROUND_FILL_CLASSES),
        min_confidence=lambda wildcards: merge_setting(wildcards.case, "min_confidence"),
        low_confidence_as=lambda wildcards: merge_setting(
            wildcards.case, "low_confidence_as"
        ),
        tolerances=GEOMETRY_TOLERANCE_ARGS,
    shell:
        MERGE_CASE_COMMAND


# a round's summary.tsv also matches round_merge_case's {case}.tsv (round 1's summary has no wildcard, so Snakemake
# prefers it there by itself)
ruleorder: round_merge_summary > round_merge_case


rule round_merge_summary:
    input:
        split=lambda wildcards: checkpoints.split.get().output.split,
        tables=lambda wildcards: [
            res(f"round{wildcards.round}", "merged", f"{case}.tsv")
            for case in merged_label_cases()
        ],
    output:
        res("round{round}", "merged", "summary.tsv"),
    log:
        log_path("round_merge_summary", "round{round}"),
    benchmark:
        bench_path("round_merge_summary", "round{round}")
    wildcard_constraints:
        round=ROUND_PATTERN,
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


rule round_student_manifest:
    input:
        images=student_training_images,
        labels=lambda wildcards: [
            res(f"round{wildcards.round}", "merged", f"{case}.nii.gz")
            for case in student_training_cases(wildcards.experiment)
        ],
    output:
        res("round{round}", "student", "{experiment}", "train_cases.tsv"),
    log:
        log_path("round_student_manifest", "round{round}_{experiment}"),
    benchmark:
        bench_path("round_student_manifest", "round{round}_{experiment}")
    wildcard_constraints:
        round=ROUND_PATTERN,
        experiment=ROUND_EXPERIMENT_PATTERN,
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    run:
        write_student_manifest(
            wildcards.experiment, output[0], input.images, input.labels
        )


rule round_student_train:
    input:
        manifest=res("round{round}", "student", "{experiment}", "train_cases.tsv"),
    output:
        model=res("round{round}", "student", "{experiment}", "model", "model_final.pt"),
        log=res("round{round}", "student", "{experiment}", "model", "training_log.tsv"),
    log:
        log_path("round_student_train", "round{round}_{experiment}"),
    benchmark:
        bench_path("round_student_train", "round{round}_{experiment}")
    wildcard_constraints:
        round=ROUND_PATTERN,
        experiment=ROUND_EXPERIMENT_PATTERN,
    conda:
        "../envs/student.yaml"
    threads: student_train_threads
    resources:
        mem_mb=config["student"]["mem_mb"],
        runtime=runtime_by_attempt(config["student"]["runtime"]),
        gpu=int(config["device"] == "cuda"),
    params:
        py=PY,
        c2f=lambda wildcards: json.dumps(
            round_c2f(config["student"]["c2f"], ROUNDS, int(wildcards.round))
        ),
        label_ids=" ".join(str(i) for i in LABELS),
        ignore=ignore_label(config["labels"]),
        work_dir=lambda wildcards: res(
            f"round{wildcards.round}", "student", wildcards.experiment, "checkpoints"
        ),
        device=config["device"],
    shell:
        STUDENT_TRAIN_COMMAND


# One prediction job per shard of test cases, as in round 1 (prediction_shards in common.smk).
for round_shard in prediction_shards(
    "round_student_predict",
    res("round{round}", "student", "{experiment}", "pred"),
    config["student"]["shard_size"],
    "round{round}_{experiment}_",
):

    rule:
        name:
            round_shard.name
        input:
            model=res(
                "round{round}", "student", "{experiment}", "model", "model_final.pt"
            ),
            images=round_shard.images,
        output:
            predictions=round_shard.predictions,
            efficiency=round_shard.efficiency,
            boxes=round_shard.boxes,
        log:
            round_shard.log,
        benchmark:
            round_shard.benchmark
        wildcard_constraints:
            round=ROUND_PATTERN,
            experiment=ROUND_EXPERIMENT_PATTERN,
        conda:
            "../envs/student.yaml"
        threads: config["student"]["threads"]
        resources:
            mem_mb=config["student"]["predict_mem_mb"],
            runtime=config["student"]["predict_runtime"],
            gpu=int(config["device"] == "cuda"),
        params:
            py=PY,
            cases=round_shard.cases,
            label_map=LABEL_MAP,
            postprocess=POSTPROCESS,
            margin_mm=lambda wildcards: round_c2f_setting(wildcards.round, "margin_mm"),
            amp=lambda wildcards: round_c2f_setting(wildcards.round, "amp"),
            interval=config["eval"]["gpu_sample_interval_s"],
            device=config["device"],
        shell:
            STUDENT_PREDICT_COMMAND


rule round_evaluate:
    input:
        gt=scored_test_labels,
        pred=lambda wildcards: [
            res(
                f"round{wildcards.round}",
                "student",
                wildcards.experiment,
                "pred",
                f"{case}.nii.gz",
            )
            for case in SCORED_TEST_CASES
        ],
    output:
        metrics=res("round{round}", "eval", "{experiment}", "metrics.tsv"),
        summary=report(
            res("round{round}", "eval", "{experiment}", "summary.tsv"),
            category="Evaluation",
            subcategory="round {round}: {experiment}",
            caption="../report/summary.rst",
            labels={
                "experiment": "{experiment} (round {round})",
                "table": "DSC / NSD summary",
            },
        ),
    log:
        log_path("round_evaluate", "round{round}_{experiment}"),
    benchmark:
        bench_path("round_evaluate", "round{round}_{experiment}")
    wildcard_constraints:
        round=ROUND_PATTERN,
        experiment=ROUND_EXPERIMENT_PATTERN,
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


# every eval.ablation column, the retrained students once per round
ROUND_COLUMNS = side_by_side(
    config["eval"]["ablation"], ROUND_EVAL_EXPERIMENTS, ROUNDS["count"]
)


rule rounds_table:
    input:
        [
            round_res(number, "eval", experiment, "summary.tsv")
            for _, experiment, number in ROUND_COLUMNS
        ],
    output:
        report(
            res("eval", "rounds.tsv"),
            category="Evaluation",
            caption="../report/rounds.rst",
            labels={"experiment": "all", "table": "rounds side by side"},
        ),
    log:
        log_path("rounds_table"),
    benchmark:
        bench_path("rounds_table")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["eval"]["mem_mb"],
        runtime=config["eval"]["runtime"],
    params:
        py=PY,
        experiments=" ".join(name for name, _, _ in ROUND_COLUMNS),
    shell:
        ABLATION_COMMAND


TARGETS["rounds"] = [
    path
    for number in LATER_ROUNDS
    for path in [round_res(number, "merged", "summary.tsv")]
    + [round_model(number, experiment) for experiment in ROUND_EXPERIMENTS]
    + [
        round_res(number, "student", experiment, "pred", f"{case}.nii.gz")
        for experiment in ROUND_EXPERIMENTS
        for case in TEST_CASES
    ]
    + (
        [
            round_res(number, "eval", experiment, name)
            for experiment in ROUND_EVAL_EXPERIMENTS
            for name in ("metrics.tsv", "summary.tsv")
        ]
        if SCORED_TEST_CASES
        else []
    )
] + ([res("eval", "rounds.tsv")] if LATER_ROUNDS and SCORED_TEST_CASES else [])
