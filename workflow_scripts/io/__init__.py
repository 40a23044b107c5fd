"""Shared input/output: volumes with their exact geometry and atomic writes (``volumes``), dataset discovery and the
demo's folder layout (``layout``), the label map (``label_map``), the students' training manifest (``manifest``) and
the config's schema defaults for scripts run outside Snakemake (``config_defaults``).

Used by every stage; rules/common.smk imports ``layout`` and ``volumes`` while Snakemake parses the workflow, and
rules/student.smk and rules/student_nnunet.smk write the manifest with ``manifest``.
"""
