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


TARGETS["split"] = [res("split", "split.tsv")]
