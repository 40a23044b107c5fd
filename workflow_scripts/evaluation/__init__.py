"""Evaluation: FLARE DSC/NSD (``metrics``, ``evaluate``), time and memory per case (``efficiency``, written by every
prediction job; ``efficiency_report`` collects an experiment's shards), the ablation table (``ablation``) and the
report figures (``figures``).

Rule files: rules/evaluation.smk, rules/report.smk.
"""
