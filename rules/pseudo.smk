# Rules of the pseudo stage: the teacher's TTA pseudo-labels and confidence maps for the weak cases (and the
# unlabeled ones with pseudo.include_unlabeled; workflow_scripts/labels/pseudo.py). One job per shard of about
# pseudo.shard_size cases (pseudo_shards in common.smk: named after its first case, stable when cases are added)
# loads the model once and writes results/pseudo/shards/{shard}/; a local per-case rule hard-links each case's two
# files to results/pseudo/, so every case is its own artifact for the merge. The teacher's model paths (TEACHER_*)
# come from common.smk.

from workflow_scripts.labels.pseudo import case_files, shard_of

PSEUDO = config["pseudo"]


rule pseudo_shard:
    input:
        model=TEACHER_CHECKPOINT,
        images=lambda wildcards: [
            TRAIN[case]["image"] for case in pseudo_shards()[wildcards.shard]
        ],
    output:
        directory(res("pseudo", "shards", "{shard}")),
    log:
        log_path("pseudo_shard", "{shard}"),
    benchmark:
        bench_path("pseudo_shard", "{shard}")
    wildcard_constraints:
        shard=CASE_ID,
    priority: TRAINING_PATH_PRIORITY
    conda:
        "../envs/nnunet.yaml"
    threads: PSEUDO["threads"]
    resources:
        mem_mb=PSEUDO["mem_mb"],
        runtime=PSEUDO["runtime"],
        gpu=int(config["device"] == "cuda"),
    params:
        py=PY,
        model=lambda wildcards, input: os.path.dirname(os.path.dirname(input.model)),
        fold=TEACHER["fold"],
        tta="--tta" if PSEUDO["tta"] else "--no-tta",
        tta_batch=PSEUDO["tta_batch"],
        device=config["device"],
        cases=lambda wildcards: " ".join(pseudo_shards()[wildcards.shard]),
        label_map=LABEL_MAP,
        postprocess=POSTPROCESS,
    shell:
        "{params.py}.labels.pseudo --models {params.model:q} --fold {params.fold}"
        " {params.tta} --tta-batch {params.tta_batch} --device {params.device} --threads {threads}"
        " --cases {params.cases} --images {input.images:q} --label-map {params.label_map:q}"
        " --postprocess {params.postprocess:q} --output {output:q} > {log:q} 2>&1"


localrules:
    pseudo_case,


rule pseudo_case:
    input:
        lambda wildcards: res(
            "pseudo",
            "shards",
            shard_of(wildcards.case, pseudo_shards()),
        ),
    output:
        label=res("pseudo", "{case}.nii.gz"),
        confidence=res("pseudo", "{case}_confidence.nii.gz"),
    log:
        log_path("pseudo_case", "{case}"),
    benchmark:
        bench_path("pseudo_case", "{case}")
    wildcard_constraints:
        case=f"{CASE_ID}(?<!_confidence)",
    priority: TRAINING_PATH_PRIORITY
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
