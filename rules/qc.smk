# Ingest / QC: every training case is checked once; a bad one fails the run or, with qc.on_error=skip, is left
# out of every later stage (listed in results/qc/rejected.tsv).


rule qc_case:
    input:
        image=train_image,
        label=train_label,
    output:
        res("qc", "{case}.json"),
    log:
        log_path("qc_case", "{case}"),
    benchmark:
        bench_path("qc_case", "{case}")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["qc"]["mem_mb"],
        runtime=config["qc"]["runtime"],
    params:
        py=PY,
        label=qc_label_arg,
        label_map=LABEL_MAP,
        on_error=config["qc"]["on_error"],
        tolerances=GEOMETRY_TOLERANCE_ARGS,
    shell:
        "{params.py}.ingest.qc case --case {wildcards.case} --image {input.image:q} {params.label}"
        " --label-map {params.label_map:q} --on-error {params.on_error} {params.tolerances}"
        " --output {output:q} > {log:q} 2>&1"


checkpoint qc_summary:
    input:
        expand(res("qc", "{case}.json"), case=sorted(TRAIN)),
    output:
        accepted=res("qc", "accepted.tsv"),
        rejected=res("qc", "rejected.tsv"),
    log:
        log_path("qc_summary"),
    benchmark:
        bench_path("qc_summary")
    conda:
        "../envs/base.yaml"
    threads: 1
    resources:
        mem_mb=config["qc"]["mem_mb"],
        runtime=config["qc"]["runtime"],
    params:
        py=PY,
    shell:
        "{params.py}.ingest.qc summary --accepted {output.accepted:q} --rejected {output.rejected:q}"
        " {input:q} > {log:q} 2>&1"


TARGETS["qc"] = [res("qc", "accepted.tsv"), res("qc", "rejected.tsv")]
