"""Evaluation: FLARE DSC/NSD (``metrics``, ``evaluate``), time and memory per case (``efficiency``, written by every
prediction job; ``efficiency_report`` collects an experiment's shards), the ablation table (``ablation``) and the
report figures (``figures``); whether and how well the models learned: learning curves (``learning_curves``), the
c2f student's coarse box and fine DSC apart (``c2f_stages``), and the supplemented labels against a complete truth
(``label_quality``).

Rule files: rules/evaluation.smk, rules/report.smk, rules/learning.smk.
"""
