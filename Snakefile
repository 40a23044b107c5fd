"""Two-stage weak-label segmentation of abdominal CT (organs + pan-cancer lesions).

Stages: demo data -> QC -> label statistics -> split -> nnU-Net teacher -> TTA pseudo-labels -> label merging
-> student retraining (optionally repeated in rounds) -> evaluation and report. See README.md and ../shared/DESIGN.md.
"""

from snakemake.utils import min_version, validate

min_version("9.0")


# The demo's config is the base only of a run without --configfile. A user's config (config/flare23.yaml) replaces it,
# and every key that config leaves out takes the schema's default, the full-size value: Snakemake's own layering
# would hand a real-data run the demo's CPU-sized networks, schedules and memory. To change a few demo settings,
# name both files: --configfile config/config.yaml my_changes.yaml (README, "Configuration files").
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, schema="config/schema.yaml")


include: "rules/common.smk"


wildcard_constraints:
    case=CASE_ID,
    experiment="[A-Za-z0-9_]+",


include: "rules/demo.smk"
include: "rules/qc.smk"
include: "rules/stats.smk"
include: "rules/split.smk"
include: "rules/teacher.smk"
include: "rules/pseudo.smk"
include: "rules/merge.smk"
include: "rules/student.smk"
include: "rules/student_nnunet.smk"
include: "rules/evaluation.smk"
include: "rules/rounds.smk"
include: "rules/report.smk"
include: "rules/learning.smk"
include: "rules/predict.smk"


report: "report/workflow.rst"


rule all:
    default_target: True
    input:
        all_targets(),
