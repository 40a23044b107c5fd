"""Pure, importable building blocks of the two-stage weak-label segmentation workflow.

One module per stage; rules call them through thin command-line entries (``python -m workflow_scripts.<module>``).
"""
