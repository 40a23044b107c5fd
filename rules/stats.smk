# Label statistics (the paper's Fig. 2): per accepted labelled case, then aggregated into tables and figures.


rule stats_case:
    input:
        label=lambda wildcards: TRAIN[wildcards.case]["label"],
        qc=res("qc", "{case}.json"),
    output:
        res("stats", "cases", "{case}.tsv"),
    log:
        log_path("stats_case", "{case}"),
    benchmark:
        bench_path("stats_case", "{case}")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["stats"]["mem_mb"],
        runtime=config["stats"]["runtime"],
    params:
        py=PY,
        label_map=LABEL_MAP,
        connectivity=config["stats"]["connectivity"],
    shell:
        "{params.py}.ingest.stats case --case {wildcards.case} --label {input.label:q} --qc {input.qc:q}"
        " --label-map {params.label_map:q} --connectivity {params.connectivity}"
        " --output {output:q} > {log:q} 2>&1"


rule stats_aggregate:
    input:
        lambda wildcards: expand(
            res("stats", "cases", "{case}.tsv"), case=labelled_accepted_cases()
        ),
    output:
        table=res("stats", "label_stats.tsv"),
        summary=res("stats", "class_summary.tsv"),
        counts=report(
            res("stats", "label_counts.png"),
            category="Label statistics",
            labels={"figure": "annotated classes per case"},
        ),
        presence=report(
            res("stats", "class_presence.png"),
            category="Label statistics",
            labels={"figure": "cases per class"},
        ),
    log:
        log_path("stats_aggregate"),
    benchmark:
        bench_path("stats_aggregate")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["stats"]["mem_mb"],
        runtime=config["stats"]["runtime"],
    params:
        py=PY,
        label_map=LABEL_MAP,
    shell:
        "{params.py}.ingest.stats aggregate --label-map {params.label_map:q} --table {output.table:q}"
        " --summary {output.summary:q} --counts-png {output.counts:q}"
        " --presence-png {output.presence:q} {input:q} > {log:q} 2>&1"


TARGETS["stats"] = [
    res("stats", "label_stats.tsv"),
    res("stats", "class_summary.tsv"),
    res("stats", "label_counts.png"),
    res("stats", "class_presence.png"),
]
