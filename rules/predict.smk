# Rules of prediction on new scans (config section `predict`; README "Prediction on new scans"): a trained model, a
# student experiment or the teacher, applied to a folder of images without labels through the same predictor as its
# test-set predictions (workflow_scripts/c2f/predict.py for a c2f student, workflow_scripts/nnunet/predict.py for
# the teacher and the nnU-Net students), one job per shard of cases (prediction_shards in common.smk). Outputs:
# results/predict/<name>/<case>.nii.gz (uint8, the input's exact geometry) and results/predict/<name>/efficiency.tsv
# (the per-shard tables merged by workflow_scripts/evaluation/efficiency_report.py). Target: `snakemake predict`,
# which builds these and only what the model needs (nothing, once it is trained); `rule all` includes them while
# predict.images is set. With predict.images null (the default) no prediction job exists and `snakemake predict`
# stops with an error saying so.

from workflow_scripts.io.layout import new_scans

PREDICT = config["predict"]


if PREDICT["images"] is not None:
    PREDICT_MODEL = PREDICT["model"]
    PREDICT_NAME, PREDICT_SCANS = new_scans(
        PREDICT["images"], PREDICT["image_suffix"], PREDICT["name"]
    )
    PREDICT_CHECKPOINTS = predict_model_checkpoints(PREDICT_MODEL)
    PREDICT_DIR = res("predict", PREDICT_NAME)
    # the model's own prediction settings: the teacher's are those of its test predictions and pseudo-labels
    PREDICT_JOB = (
        config["pseudo"] | {"fold": TEACHER["fold"]}
        if PREDICT_MODEL == "teacher"
        else {
            "threads": config["student"]["threads"],
            "mem_mb": config["student"]["predict_mem_mb"],
            "runtime": config["student"]["predict_runtime"],
            "tta": False,
            "tta_batch": config["pseudo"]["tta_batch"],
            "fold": NNUNET_STUDENT["fold"],
        }
    )
    PREDICT_SHARDS = list(
        prediction_shards(
            "predict_shard",
            PREDICT_DIR,
            shard_size_of(PREDICT_MODEL),
            f"{PREDICT_NAME}_",
            images=PREDICT_SCANS,
        )
    )

    for predict_shard in PREDICT_SHARDS:
        if PREDICT_MODEL in C2F_LABELS:

            rule:
                name:
                    predict_shard.name
                input:
                    model=PREDICT_CHECKPOINTS[0],
                    images=predict_shard.images,
                output:
                    predictions=predict_shard.predictions,
                    efficiency=predict_shard.efficiency,
                log:
                    predict_shard.log,
                benchmark:
                    predict_shard.benchmark
                conda:
                    "../envs/student.yaml"
                threads: PREDICT_JOB["threads"]
                resources:
                    mem_mb=PREDICT_JOB["mem_mb"],
                    runtime=PREDICT_JOB["runtime"],
                    gpu=int(config["device"] == "cuda"),
                params:
                    py=PY,
                    cases=predict_shard.cases,
                    label_map=LABEL_MAP,
                    postprocess=POSTPROCESS,
                    margin_mm=config["student"]["c2f"]["margin_mm"],
                    amp=config["student"]["c2f"]["amp"],
                    interval=config["eval"]["gpu_sample_interval_s"],
                    device=config["device"],
                shell:
                    "{params.py}.c2f.predict --model {input.model:q} --cases {params.cases}"
                    " --images {input.images:q} --outputs {output.predictions:q}"
                    " --efficiency {output.efficiency:q} --label-map {params.label_map:q}"
                    " --postprocess {params.postprocess:q} --margin-mm {params.margin_mm}"
                    " --device {params.device} --amp {params.amp} --threads {threads}"
                    " --interval {params.interval} > {log:q} 2>&1"

        else:

            rule:
                name:
                    predict_shard.name
                input:
                    checkpoints=PREDICT_CHECKPOINTS,
                    images=predict_shard.images,
                output:
                    predictions=predict_shard.predictions,
                    efficiency=predict_shard.efficiency,
                log:
                    predict_shard.log,
                benchmark:
                    predict_shard.benchmark
                conda:
                    "../envs/nnunet.yaml"
                threads: PREDICT_JOB["threads"]
                resources:
                    mem_mb=PREDICT_JOB["mem_mb"],
                    runtime=PREDICT_JOB["runtime"],
                    gpu=int(config["device"] == "cuda"),
                params:
                    py=PY,
                    models=lambda wildcards, input: [
                        os.path.dirname(os.path.dirname(c)) for c in input.checkpoints
                    ],
                    fold=PREDICT_JOB["fold"],
                    tta="--tta" if PREDICT_JOB["tta"] else "--no-tta",
                    tta_batch=PREDICT_JOB["tta_batch"],
                    cases=predict_shard.cases,
                    label_map=LABEL_MAP,
                    postprocess=POSTPROCESS,
                    interval=config["eval"]["gpu_sample_interval_s"],
                    device=config["device"],
                shell:
                    "{params.py}.nnunet.predict --models {params.models:q} --fold {params.fold}"
                    " {params.tta} --tta-batch {params.tta_batch} --device {params.device} --threads {threads}"
                    " --cases {params.cases} --images {input.images:q} --outputs {output.predictions:q}"
                    " --efficiency {output.efficiency:q} --label-map {params.label_map:q}"
                    " --postprocess {params.postprocess:q} --interval {params.interval} > {log:q} 2>&1"

    rule predict:
        input:
            tables=[shard.efficiency for shard in PREDICT_SHARDS],
            predictions=[path for shard in PREDICT_SHARDS for path in shard.predictions],
        output:
            res("predict", PREDICT_NAME, "efficiency.tsv"),
        log:
            log_path("predict", PREDICT_NAME),
        benchmark:
            bench_path("predict", PREDICT_NAME)
        conda:
            "../envs/base.yaml"
        threads: 1
        resources:
            mem_mb=config["eval"]["mem_mb"],
            runtime=config["eval"]["runtime"],
        params:
            py=PY,
            cases=" ".join(sorted(PREDICT_SCANS)),
        shell:
            "{params.py}.evaluation.efficiency_report --tables {input.tables:q} --cases {params.cases}"
            " --output {output:q} > {log:q} 2>&1"

    TARGETS["predict"] = [
        path for shard in PREDICT_SHARDS for path in shard.predictions
    ] + [res("predict", PREDICT_NAME, "efficiency.tsv")]

else:

    rule predict:
        input:
            lambda wildcards: sys.exit(
                "error: nothing to predict: set predict.images (and predict.model) in the config,"
                " e.g. --config predict='{images: /data/new_scans, model: two_stage}'"
            ),
        log:
            log_path("predict"),
        benchmark:
            bench_path("predict")
        threads: 1
        resources:
            mem_mb=100,
            runtime=1,
