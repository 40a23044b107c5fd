"""Labels made from the teacher: pseudo-labels with confidence maps per shard (``pseudo``), the connected-component
cleanup of every prediction (``postprocess``) and the merge of weak labels with pseudo-labels (``merge``).

Rule files: rules/pseudo.smk, rules/merge.smk; rules/common.smk shards the pseudo-labelling with ``pseudo``.
"""
