"""The embedded synthetic FLARE23-like dataset: the plan of cases from the config alone (``plan``), the anatomy
(``anatomy``) and the intensities, annotations and files (``dataset``).

Rule files: rules/demo.smk (rule demo_dataset); rules/common.smk imports ``plan`` to know every demo file up front.
"""
