"""nnU-Net v2 as a library: raw datasets (``dataset``), planning, preprocessing and resumable training shared by the
teacher and the nnU-Net student (``training``), the teacher's CLI (``teacher``), the nnU-Net student option
(``student``), one-process inference with ensembles (``predict``), batched mirroring TTA (``mirroring``) and the
per-job environment plus the trainer that nnU-Net finds through ``nnUNet_extTrainer`` (``ext``).

Rule files: rules/teacher.smk, rules/pseudo.smk (through workflow_scripts.labels.pseudo), rules/student_nnunet.smk;
rules/common.smk imports the teacher's model paths from ``dataset`` and ``training``.
"""
