"""Pure, importable building blocks of the two-stage weak-label segmentation workflow.

One subpackage per stage (``ingest``, ``demo``, ``nnunet``, ``c2f``, ``labels``, ``evaluation``) plus ``io`` for what
they share; rules call the modules through thin command-line entries
(``python -m workflow_scripts.<subpackage>.<module>``). The package is installed into the project venv (pyproject.toml).
"""
