# Split: accepted cases become strong (every class of split.strong_requires annotated), weak or unlabeled.


checkpoint split:
    input:
        accepted=res("qc", "accepted.tsv"),
        label_stats=res("stats", "label_stats.tsv"),
    output:
        split=res("split", "split.tsv"),
    log:
        log_path("split"),
    benchmark:
        bench_path("split")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["split"]["mem_mb"],
        runtime=config["split"]["runtime"],
    params:
        py=PY,
        strong_requires=config["split"]["strong_requires"],
        label_map=LABEL_MAP,
    shell:
        "{params.py}.ingest.split --accepted {input.accepted:q} --label-stats {input.label_stats:q}"
        " --strong-requires {params.strong_requires} --label-map {params.label_map:q}"
        " --output {output.split:q} > {log:q} 2>&1"


# Cases per category of the split, of the pseudo-labels and of every student experiment (strong, weak, unlabeled):
# what each student trains on, known before the teacher trains (workflow_scripts/ingest/students.py).
rule split_students:
    input:
        split=res("split", "split.tsv"),
    output:
        res("split", "students.tsv"),
    log:
        log_path("split_students"),
    benchmark:
        bench_path("split_students")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["split"]["mem_mb"],
        runtime=config["split"]["runtime"],
    params:
        py=PY,
        experiments=json.dumps(config["student"]["experiments"]),
        pseudo_unlabeled="--pseudo-unlabeled" if PSEUDO_UNLABELED else "",
    shell:
        "{params.py}.ingest.students --split {input.split:q} --experiments {params.experiments:q}"
        " {params.pseudo_unlabeled} --output {output:q} > {log:q} 2>&1"


TARGETS["split"] = [res("split", "split.tsv"), res("split", "students.tsv")]
