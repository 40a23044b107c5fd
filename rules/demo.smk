# Embedded synthetic FLARE23-like dataset: every image, label, truth and test file of the demo plan is an explicit
# output of one job (the plan is known from the config alone), so later stages simply depend on the files.

import json

from workflow_scripts.demo.plan import dataset_json_path, truth_path

if config["demo"]["enabled"]:

    rule demo_dataset:
        output:
            images=[TRAIN[case]["image"] for case in DEMO_PLAN.train],
            labels=[TRAIN[case]["label"] for case in DEMO_PLAN.labelled],
            truth=[truth_path(RESULTS, case) for case in DEMO_PLAN.train],
            test_images=[TEST[case]["image"] for case in DEMO_PLAN.test],
            test_labels=[TEST[case]["label"] for case in DEMO_PLAN.test],
            dataset=dataset_json_path(RESULTS),
        log:
            log_path("demo_dataset"),
        benchmark:
            bench_path("demo_dataset")
        conda:
            "../envs/base.yaml"
        threads: config["demo"]["threads"]
        resources:
            mem_mb=config["demo"]["mem_mb"],
            runtime=config["demo"]["runtime"],
        params:
            spec=json.dumps({"demo": config["demo"], "labels": config["labels"]}),
            py=PY,
        shell:
            "{params.py}.demo.dataset --spec {params.spec:q} --dataset-json {output.dataset:q}"
            " --threads {threads} > {log:q} 2>&1"
