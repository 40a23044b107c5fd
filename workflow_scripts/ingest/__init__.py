"""Ingest: per-case quality control (``qc``), label statistics (``stats``, the paper's Fig. 2) and the
strong/weak/unlabeled split (``split``).

Rule files: rules/qc.smk, rules/stats.smk, rules/split.smk.
"""
