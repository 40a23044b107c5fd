"""The coarse-to-fine student (own PyTorch implementation): network (``model``), data handling and augmentation
(``data``), resumable training from a manifest (``train``) and sharded test-set prediction (``predict``).

Rule file: rules/student.smk (experiments with model c2f).
"""
